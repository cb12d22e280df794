package block

// Caps is what a Device can do beyond reading, writing and flushing: which
// of the optional interfaces (Trimmer, Zeroer, …) it means to be used.
//
// The composition contract: a device that wraps another (an encryption
// layer, a filter) declares its Caps, exactly what it passes on or adds,
// and implements those methods. Users ask CapsOf and Optional, never a
// bare type assertion: an embedded device's promoted methods would
// otherwise leak through a wrapper that means to hide them (a raw Trim
// under an encryption layer), and a wrapper that forgot one would hide it
// silently.
type Caps uint32

const (
	CanTrim    Caps = 1 << iota // Trimmer
	CanZero                     // Zeroer
	CanExtents                  // Extenter
	CanCache                    // Cacher
	CanTryRead                  // TryReader
	CanFile                     // Filer: the device's bytes are its file's, in order (zero-copy)
	// CanFastWrite: no interface, a promise: a write completes at memory
	// speed (a page cache takes it), so a transport may run small writes
	// on its reader instead of handing them to a worker. A device whose
	// writes wait for a network round trip (an upstream server, Ceph)
	// must not declare it: its writes would then run one at a time.
	CanFastWrite
	CanSubmit  // Submitter
	CanMap     // Mapper: reads lent from a mapping of the device's file
	CanChanges // ChangeTracker
)

// Capable is implemented by devices that declare their Caps.
type Capable interface {
	Caps() Caps
}

// Optional holds a device's optional interfaces, nil where it has none
// (or does not declare it).
type Optional struct {
	Trimmer   Trimmer
	Zeroer    Zeroer
	Extenter  Extenter
	Cacher    Cacher
	TryReader TryReader
	Filer     Filer
	Submitter Submitter
	Mapper    Mapper
	Changes   ChangeTracker
	FastWrite bool // CanFastWrite declared
}

// OptionalOf returns d's optional interfaces: for a Capable device those
// it declares (and implements), for any other those it implements.
func OptionalOf(d Device) Optional {
	caps := ^Caps(0)
	if c, ok := d.(Capable); ok {
		caps = c.Caps()
	}
	var o Optional
	if caps&CanTrim != 0 {
		o.Trimmer, _ = d.(Trimmer)
	}
	if caps&CanZero != 0 {
		o.Zeroer, _ = d.(Zeroer)
	}
	if caps&CanExtents != 0 {
		o.Extenter, _ = d.(Extenter)
	}
	if caps&CanCache != 0 {
		o.Cacher, _ = d.(Cacher)
	}
	if caps&CanTryRead != 0 {
		o.TryReader, _ = d.(TryReader)
	}
	if caps&CanFile != 0 {
		o.Filer, _ = d.(Filer)
	}
	if caps&CanSubmit != 0 {
		o.Submitter, _ = d.(Submitter)
	}
	if caps&CanMap != 0 {
		o.Mapper, _ = d.(Mapper)
	}
	if caps&CanChanges != 0 {
		o.Changes, _ = d.(ChangeTracker)
	}
	if _, ok := d.(Capable); ok {
		o.FastWrite = caps&CanFastWrite != 0 // an undeclared device promises nothing
	}
	return o
}

// Caps of the devices of this package.
func (d *File) Caps() Caps {
	return CanTrim | CanZero | CanExtents | CanCache | CanTryRead | CanFile | CanFastWrite | CanMap
}

func (m *Mem) Caps() Caps { return CanTrim | CanZero | CanFastWrite }
