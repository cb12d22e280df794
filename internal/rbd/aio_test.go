//go:build ceph

package rbd

// The asynchronous path (aio.go) against a real single-node Ceph cluster
// that the test brings up with the e2e tests' script
// (e2e/testdata/ceph-up.sh: one monitor, one BlueStore OSD on a sparse
// file, about 15 s) and tears down. make test runs it with the ceph tags.

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"goldilocks/internal/block"
)

const (
	aioImageSize = 64 << 20
	aioBlock     = 4096
	// aioWait bounds every wait of these tests: a request that never
	// completes (a submission never started) fails the test, not make test.
	aioWait = 60 * time.Second
)

// testCluster starts a cluster with an image rbd/aio and returns its spec.
func testCluster(t *testing.T) Spec {
	t.Helper()
	for _, c := range []string{"ceph-mon", "ceph-osd", "rbd"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("%s not installed (make deps installs Ceph): %v", c, err)
		}
	}
	base := filepath.Join(t.TempDir(), "ceph")
	port := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
	}
	osdMin := 39000 + (os.Getpid()%80)*100
	script := func(name string) *exec.Cmd {
		cmd := exec.Command("bash", filepath.Join("..", "..", "e2e", "testdata", name))
		cmd.Env = append(os.Environ(), "BASE="+base, "MON_V2="+port(), "MON_V1="+port(),
			fmt.Sprintf("OSD_PORT_MIN=%d", osdMin), fmt.Sprintf("OSD_PORT_MAX=%d", osdMin+99),
			"IMG=aio", "IMG_SIZE=64M")
		return cmd
	}
	out, err := script("ceph-up.sh").CombinedOutput()
	t.Cleanup(func() {
		if out, err := script("ceph-down.sh").CombinedOutput(); err != nil {
			t.Logf("ceph-down: %v\n%s", err, out)
		}
	})
	if err != nil {
		t.Fatalf("ceph-up: %v\n%s", err, out)
	}
	return Spec{Pool: "rbd", Image: "aio", Conf: filepath.Join(base, "ceph.conf")}
}

// pattern is block n's bytes in generation g.
func pattern(n, g int) []byte {
	p := make([]byte, aioBlock)
	for i := range p {
		p[i] = byte(n*7 + g*13 + i%251)
	}
	return p
}

// within runs f and fails the test if it has not returned after aioWait.
func within(t *testing.T, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); f() }()
	select {
	case <-done:
	case <-time.After(aioWait):
		t.Fatalf("%s: no return after %v (a request never started or never completed)", what, aioWait)
	}
}

func TestAIO(t *testing.T) {
	spec := testCluster(t)
	img, err := Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	if img.aio == nil {
		t.Fatal("the image has no aio: go-ceph's image handle was not reachable")
	}
	defer func() {
		if img != nil {
			img.Close()
		}
	}()
	if img.Size() != aioImageSize {
		t.Fatalf("size %d, want %d", img.Size(), aioImageSize)
	}
	const blocks = aioSlots + 64
	for n := range blocks {
		if _, err := img.WriteAt(pattern(n, 0), int64(n)*aioBlock); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}

	// A reader that submits more than there are slots before it pushes,
	// then reads in the ordinary way for what was declined: the slots are
	// all held by requests not yet started, so the read must start them.
	t.Run("slots held by requests not pushed", func(t *testing.T) {
		bufs := make([][]byte, blocks)
		var (
			mu      sync.Mutex
			results = map[int]error{}
			all     sync.WaitGroup
		)
		firstDeclined := -1
		for n := range blocks {
			bufs[n] = make([]byte, aioBlock)
			all.Add(1)
			if img.SubmitReadAt(bufs[n], int64(n)*aioBlock, func(err error, _ *block.Batch) {
				mu.Lock()
				results[n] = err
				mu.Unlock()
				all.Done()
			}) {
				continue
			}
			all.Done()
			if firstDeclined < 0 {
				firstDeclined = n
			}
			within(t, fmt.Sprintf("ReadAt of block %d with every slot held by requests not pushed", n), func() {
				if _, err := img.ReadAt(bufs[n], int64(n)*aioBlock); err != nil {
					t.Errorf("block %d: %v", n, err)
				}
			})
		}
		if firstDeclined != aioSlots {
			t.Errorf("the first read declined was number %d, want %d (one per slot)", firstDeclined, aioSlots)
		}
		img.Push()
		within(t, "the submitted reads", all.Wait)
		for n := range blocks {
			if err := results[n]; err != nil {
				t.Errorf("block %d: %v", n, err)
			}
			if !bytes.Equal(bufs[n], pattern(n, 0)) {
				t.Errorf("block %d: read back other bytes than were written", n)
			}
		}
	})

	// The request path allocates nothing: the slot, its pinner and the
	// completion's callback are the aio's, bound once.
	t.Run("a submitted read allocates nothing", func(t *testing.T) {
		p := make([]byte, aioBlock)
		errc := make(chan error, 1)
		done := func(err error, _ *block.Batch) { errc <- err }
		allocs := testing.AllocsPerRun(200, func() {
			if !img.SubmitReadAt(p, 0, done) {
				t.Fatal("declined with nothing in flight")
			}
			img.Push()
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%.1f allocations per submitted read, want 0", allocs)
		}
	})

	// librbd's refusal, and a failure it reports on completion, reach the
	// caller as errors (a read past the image's end: the range checks of
	// ReadAt are bypassed here on purpose).
	t.Run("librbd's errors", func(t *testing.T) {
		var ret int64
		within(t, "a read past the end", func() { ret = img.aio.do(opRead, aioImageSize+aioBlock, make([]byte, aioBlock)) })
		if ret >= 0 {
			t.Errorf("a read past the image's end: librbd's result %d, want an errno", ret)
		}
	})

	// Goroutines each on blocks of their own write (synchronously and
	// submitted), read (both ways) and flush at random; every read returns
	// the block's last acknowledged generation. The garbage collector runs
	// throughout, over buffers freed while their addresses are still in
	// the C queue's requests.
	t.Run("model", func(t *testing.T) {
		const workers, perWorker, ops = 8, 16, 400
		var wg sync.WaitGroup
		stop := make(chan struct{})
		gcDone := make(chan struct{})
		go func() {
			defer close(gcDone)
			for {
				select {
				case <-stop:
					return
				default:
					runtime.GC()
				}
			}
		}()
		defer func() { close(stop); <-gcDone }()
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(w), 42))
				gen := make([]int, perWorker) // generation 0 was written above
				wait := func(submit func(done func(error, *block.Batch)) bool, inline func() error) error {
					errc := make(chan error, 1)
					if !submit(func(err error, _ *block.Batch) { errc <- err }) {
						return inline()
					}
					img.Push()
					select {
					case err := <-errc:
						return err
					case <-time.After(aioWait):
						return fmt.Errorf("no completion after %v", aioWait)
					}
				}
				for range ops {
					k := rng.IntN(perWorker)
					n := w*perWorker + k
					off := int64(n) * aioBlock
					var err error
					switch rng.IntN(5) {
					case 0:
						gen[k]++
						_, err = img.WriteAt(pattern(n, gen[k]), off)
					case 1:
						gen[k]++
						p := pattern(n, gen[k])
						err = wait(func(d func(error, *block.Batch)) bool { return img.SubmitWriteAt(p, off, false, d) },
							func() error { _, err := img.WriteAt(p, off); return err })
					case 2:
						err = img.Flush()
					default:
						p := make([]byte, aioBlock)
						if rng.IntN(2) == 0 {
							_, err = img.ReadAt(p, off)
						} else {
							err = wait(func(d func(error, *block.Batch)) bool { return img.SubmitReadAt(p, off, d) },
								func() error { _, err := img.ReadAt(p, off); return err })
						}
						if err == nil && !bytes.Equal(p, pattern(n, gen[k])) {
							err = fmt.Errorf("block %d: read back other bytes than generation %d", n, gen[k])
						}
					}
					if err != nil {
						t.Errorf("worker %d: %v", w, err)
						return
					}
				}
			}()
		}
		within(t, "the model's workers", wg.Wait)
	})

	// Close starts what was submitted and not pushed, waits for it, and
	// stops the submission thread and the completion reader.
	t.Run("close with requests not pushed", func(t *testing.T) {
		var ran sync.WaitGroup
		for n := aioSlots; n < aioSlots+10; n++ { // blocks the model left alone
			ran.Add(1)
			p := make([]byte, aioBlock)
			if !img.SubmitReadAt(p, int64(n)*aioBlock, func(err error, _ *block.Batch) {
				if err != nil || !bytes.Equal(p, pattern(n, 0)) {
					t.Errorf("block %d at close: %v or other bytes", n, err)
				}
				ran.Done()
			}) {
				t.Fatalf("read %d declined with nothing in flight", n)
			}
		}
		i := img
		img = nil
		within(t, "Close", func() {
			if err := i.Close(); err != nil {
				t.Errorf("close: %v", err)
			}
		})
		within(t, "the reads submitted before Close", ran.Wait)
	})
}
