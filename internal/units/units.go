// Package units reads sizes as qemu-img and the CLI write them: a number
// with an optional binary suffix. It owns nothing else.
package units

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseSize reads a size as qemu-img does: a number with an optional
// binary suffix (K, M, G, T, P; "KiB", "K" and "k" are the same).
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "i")
	shift := 0
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			shift = 10
		case 'm', 'M':
			shift = 20
		case 'g', 'G':
			shift = 30
		case 't', 'T':
			shift = 40
		case 'p', 'P':
			shift = 50
		}
		if shift != 0 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseUint(t, 10, 63)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G, T suffix", s)
	}
	if shift > 0 && v > (1<<63-1)>>shift {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return int64(v << shift), nil
}
