package cowmap

import "fmt"

// Format constants (crypto/FORMAT.md, "Layout", "Map node", "Log block").
const (
	BlockSize      = 4096
	EntrySize      = 64
	RefSize        = 48
	nodeHdr        = 64
	LeafFanout     = (BlockSize - nodeHdr) / EntrySize // 63
	InteriorFanout = (BlockSize - nodeHdr) / RefSize   // 84
	logHdr         = 64
	logRecord      = 8 + EntrySize
	logMACOff      = BlockSize - 32
	LogPerBlock    = (logMACOff - logHdr) / logRecord // 55
	// MaxChunks is the largest volume in chunks: DARE's sequence number,
	// the chunk index, is 32 bits.
	MaxChunks = 1 << 32
)

// Geometry is where a volume's regions are, in blocks of the store.
type Geometry struct {
	Chunks     uint64   // N
	LogBlocks  uint64   // L
	Levels     int      // tree levels; Levels-1 is the root's
	LevelCount []uint64 // nodes per level
	LevelStart []uint64 // nodes below each level
	Nodes      uint64   // T
	LogBase    uint64   // first log block
	NodeBase   uint64   // first node block
	DataBase   uint64   // first data block (home A of chunk 0)
	End        uint64   // blocks in all
}

// NewGeometry computes the layout of a volume of n chunks with a log of
// logBlocks blocks.
func NewGeometry(n, logBlocks uint64) (Geometry, error) {
	if n == 0 || n > MaxChunks {
		return Geometry{}, fmt.Errorf("cowmap: %d chunks: a volume holds 1 to 2^32 chunks (16 TiB)", n)
	}
	if logBlocks < 4 || logBlocks > 1<<24 {
		return Geometry{}, fmt.Errorf("cowmap: log of %d blocks: want 4 to 2^24", logBlocks)
	}
	g := Geometry{Chunks: n, LogBlocks: logBlocks}
	count := (n + LeafFanout - 1) / LeafFanout
	for {
		g.LevelStart = append(g.LevelStart, g.Nodes)
		g.LevelCount = append(g.LevelCount, count)
		g.Nodes += count
		if count == 1 {
			break
		}
		count = (count + InteriorFanout - 1) / InteriorFanout
	}
	g.Levels = len(g.LevelCount)
	g.LogBase = 2
	g.NodeBase = g.LogBase + logBlocks
	g.DataBase = g.NodeBase + 2*g.Nodes
	g.End = g.DataBase + 2*n
	return g, nil
}

// span is how many chunks a node of level l covers.
func span(l int) uint64 {
	s := uint64(LeafFanout)
	for ; l > 0; l-- {
		s *= InteriorFanout
	}
	return s
}

// nodeBlock is the block of node (level, index) at home loc (1 or 2).
func (g *Geometry) nodeBlock(level int, index, loc uint64) uint64 {
	return g.NodeBase + 2*(g.LevelStart[level]+index) + loc - 1
}

// DataBlock is the block of chunk c's data at location loc: home A or
// B, or a ring position in the log.
func (g *Geometry) DataBlock(c, loc uint64) uint64 {
	if IsInLog(loc) {
		return g.logBlock(LogPos(loc))
	}
	return g.DataBase + (loc-1)*g.Chunks + c
}

func (g *Geometry) logBlock(pos uint64) uint64 { return g.LogBase + pos%g.LogBlocks }
