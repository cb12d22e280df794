// Package units reads and writes sizes as qemu-img and the CLI do: a
// number with an optional binary suffix. It owns nothing else.
package units

import (
	"fmt"
	"math/big"
	"strconv"
	"strings"
)

var shifts = map[byte]uint{'k': 10, 'm': 20, 'g': 30, 't': 40, 'p': 50, 'e': 60}

// ParseSize reads a size as qemu-img does: a number, possibly with a
// decimal fraction, and an optional binary suffix K, M, G, T, P or E
// (either case, with or without "iB" or "B": "64M", "64MiB", "1.5G"). The
// result must be a whole, positive number of bytes below 2^63.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(t, "B")
	t = strings.TrimSuffix(t, "i")
	var shift uint
	if n := len(t); n > 0 {
		c := t[n-1] | 0x20 // lower case
		if sh, ok := shifts[c]; ok && t[n-1] >= 'A' {
			shift, t = sh, t[:n-1]
		}
	}
	bad := fmt.Errorf("size %q: want a positive number with an optional K, M, G, T, P or E suffix (binary: 1K = 1024), such as 64M or 1.5G", s)
	if t == "" || strings.ContainsAny(t, "+-eE_ ") || strings.HasPrefix(t, ".") || strings.HasSuffix(t, ".") {
		return 0, bad
	}
	r, ok := new(big.Rat).SetString(t)
	if !ok {
		return 0, bad
	}
	r.Mul(r, new(big.Rat).SetInt(new(big.Int).Lsh(big.NewInt(1), shift)))
	if !r.IsInt() {
		return 0, fmt.Errorf("size %q is not a whole number of bytes", s)
	}
	n := r.Num()
	if n.Sign() <= 0 {
		return 0, bad
	}
	if !n.IsInt64() {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n.Int64(), nil
}

// Format writes n bytes for people: "64 MiB", "1.5 GiB", "4095 B", with
// the largest binary unit that leaves at least 1, and at most one
// decimal (rounded half up; exact sizes show none).
func Format(n int64) string {
	if n < 1024 && n > -1024 {
		return strconv.FormatInt(n, 10) + " B"
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	neg := n < 0
	u := uint64(n)
	if neg {
		u = uint64(-n)
	}
	i := 0
	for i+1 < len(units) && u>>(10*uint(i+2)) > 0 {
		i++
	}
	unit := uint64(1) << (10 * uint(i+1))
	whole, rest := u/unit, u%unit
	tenths := (rest*10 + unit/2) / unit // rounded
	if rest > 0 && unit > 1<<53 {       // avoid overflow in rest*10 for EiB
		tenths = rest / (unit / 10)
	}
	if tenths == 10 {
		whole, tenths = whole+1, 0
	}
	if whole == 1024 && i+1 < len(units) { // 1023.96 MiB is 1 GiB
		whole, i = 1, i+1
	}
	sign := ""
	if neg {
		sign = "-"
	}
	if tenths == 0 {
		return fmt.Sprintf("%s%d %s", sign, whole, units[i])
	}
	return fmt.Sprintf("%s%d.%d %s", sign, whole, tenths, units[i])
}
