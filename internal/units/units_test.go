package units

import (
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  string
	}{
		{"4096", 4096, ""},
		{"64M", 64 << 20, ""},
		{"64m", 64 << 20, ""},
		{"64MiB", 64 << 20, ""},
		{"64MB", 64 << 20, ""},
		{"1K", 1024, ""},
		{"1k", 1024, ""},
		{"10G", 10 << 30, ""},
		{"1.5G", 3 << 29, ""},
		{"0.5K", 512, ""},
		{"2T", 2 << 40, ""},
		{"1P", 1 << 50, ""},
		{"1E", 1 << 60, ""},
		{"7E", 7 << 60, ""},
		{" 8M ", 8 << 20, ""},
		{"8E", 0, "too large"},
		{"1.5", 0, "whole number of bytes"},
		{"0.3K", 0, "whole number of bytes"},
		{"0", 0, "positive"},
		{"-1M", 0, "positive"},
		{"", 0, "positive"},
		{"M", 0, "positive"},
		{"lots", 0, "positive"},
		{"1e3", 0, "positive"},
		{"1.G", 0, "positive"},
		{"1X", 0, "positive"},
		{"1,5G", 0, "positive"},
	} {
		got, err := ParseSize(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseSize(%q) = %d, %v; want an error with %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}

func TestFormat(t *testing.T) {
	for _, tc := range []struct {
		in   int64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{1536, "1.5 KiB"},
		{64 << 20, "64 MiB"},
		{3 << 29, "1.5 GiB"},
		{1<<30 - 1, "1 GiB"}, // 1023.99… MiB rounds up to the next unit's 1
		{1<<30 + 1, "1 GiB"},
		{10<<30 + 100<<20, "10.1 GiB"},
		{1 << 40, "1 TiB"},
		{1 << 62, "4 EiB"},
		{-2048, "-2 KiB"},
	} {
		if got := Format(tc.in); got != tc.want {
			t.Errorf("Format(%d) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
