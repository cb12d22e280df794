package main

import "goldilocks/internal/units"

// parseSize reads a size as qemu-img does (internal/units).
func parseSize(s string) (int64, error) { return units.ParseSize(s) }
