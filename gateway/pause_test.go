package gateway

import (
	"testing"
	"time"
)

// A pause doubles while the first inline run after it stalls again, and
// starts over at pauseMin after a run of fast ones.
func TestPauseLengths(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	steps := []struct {
		at   time.Time // a stall ends
		want time.Duration
	}{
		{ms(0), pauseMin},                       // the first stall
		{ms(25), 2 * pauseMin},                  // right after the pause: stalls again
		{ms(70), 4 * pauseMin},                  // and again
		{ms(5000), pauseMin},                    // long after: a lone stall
		{ms(5020), 2 * pauseMin},                // at the end of that pause
		{ms(5060), 4 * pauseMin},                //
		{ms(5140), 8 * pauseMin},                //
		{ms(5300), 16 * pauseMin},               //
		{ms(5620), 32 * pauseMin},               //
		{ms(6260), pauseMax},                    // 64 pauseMin: capped
		{ms(6260 + 1000), pauseMax},             // still capped
		{ms(6260 + 2000 + 1001), pauseMin},      // more than a pause after the last one ended
		{ms(6260 + 2000 + 1001 + 41), pauseMin}, // 21 ms after a 20 ms pause ended
	}
	var p pause
	for i, s := range steps {
		p.start(s.at)
		if p.last != s.want || !p.until.Equal(s.at.Add(s.want)) {
			t.Fatalf("step %d: pause of %v until +%v, want %v", i, p.last, p.until.Sub(t0), s.want)
		}
	}
}
