package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"goldilocks/audit"
	"goldilocks/crypto"
	"goldilocks/gateway"
	"goldilocks/internal/control"
	"goldilocks/internal/volume"
)

type serveFlags struct {
	listen, unix, metrics, policy  string
	tlsCert, tlsKey, tlsCA         string
	tlsMinVersion                  string
	auditOnFailure                 string
	tlsRequired                    bool
	logLevel, logFormat            string
	maxInflight                    int
	sendfileReads                  bool
	mapReads                       bool
	alignHomes                     bool
	maxHandshakes, attachBurst     int
	maxPeerHandshakes              int
	attachRate                     float64
	replyTimeout, handshakeTimeout time.Duration
	mapCache                       string
	shutdownTimeout                time.Duration
	upgradeTimeout                 time.Duration
	outageLimit                    time.Duration
	leaseTTL                       time.Duration
	upstreamConns                  int
	cpuProfile                     string
	blockProfile                   string
	memProfile                     string
	pidFile                        string
	unixGroup, unixMode            string
	demo                           bool
}

func newServeCmd(a *app) *cobra.Command {
	var sf serveFlags
	c := &cobra.Command{
		Use:   "serve",
		Short: "Run the NBD gateway",
		Long: `Run the NBD gateway. Export names are volume names:
  nbd://127.0.0.1:10809/NAME   or   nbd+unix:///NAME?socket=DATA_DIR/nbd.sock
With --demo and no volume in the data dir, an encrypted 1 GiB volume named
"demo" is created (make run does this); without it an empty data dir stays
empty and volumes created later are served without a restart.
SIGINT or SIGTERM stops accepting, finishes in-flight requests, flushes and exits 0.
SIGUSR2 upgrades in place: the executable now at this gateway's path is
started and takes over the listeners and every NBD connection without TLS
(clients see a pause); TLS connections finish their requests and close. If
the new one fails, this one serves on (--upgrade-timeout).
Under systemd: READY=1 and STOPPING=1 on NOTIFY_SOCKET, WATCHDOG=1 when
WatchdogSec= is set, and listeners passed by socket activation (LISTEN_FDS)
replace --listen and --unix (contrib/systemd/).`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error { return serve(a, sf) },
	}
	f := c.Flags()
	f.StringVar(&sf.listen, "listen", "127.0.0.1:10809", "TCP address for NBD (empty: none)")
	f.StringVar(&sf.unix, "unix", "", "Unix socket for NBD (default DATA_DIR/nbd.sock; \"none\": none)")
	f.StringVar(&sf.metrics, "metrics", "127.0.0.1:9810", "address for Prometheus /metrics, /healthz, /readyz (empty: none)")
	f.StringVar(&sf.unixGroup, "unix-group", "", "group (name or number) that may connect to the Unix socket: mode 0660 (libvirt's QEMU: libvirt-qemu)")
	f.StringVar(&sf.unixMode, "unix-mode", "", "permission bits of the Unix socket, octal (default 0600; 0660 with --unix-group; 0666 with --policy)")
	f.StringVar(&sf.pidFile, "pid-file", "", "write the gateway's PID to FILE while it serves")
	f.BoolVar(&sf.demo, "demo", false, "with no volume in the data dir, create an encrypted 1 GiB volume \"demo\" (make run)")
	f.StringVar(&sf.policy, "policy", "", "access policy file, YAML (env GOLDILOCKS_POLICY)")
	f.StringVar(&sf.tlsCert, "tls-cert", "", "server certificate (PEM)")
	f.StringVar(&sf.tlsKey, "tls-key", "", "server private key (PEM)")
	f.StringVar(&sf.tlsCA, "tls-ca", "", "CA that signs client certificates (PEM)")
	f.BoolVar(&sf.tlsRequired, "tls-required", false, "refuse clients that do not start TLS (NBD_REP_ERR_TLS_REQD)")
	f.StringVar(&sf.tlsMinVersion, "tls-min-version", "1.2", "oldest TLS version accepted: 1.2 or 1.3 (1.3 is preferred when the client has it)")
	f.StringVar(&sf.auditOnFailure, "audit-on-failure", "fail", "when the audit log cannot be written: fail (refuse attaches and key operations) or continue")
	f.StringVar(&sf.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&sf.logFormat, "log-format", "text", "text or json")
	f.IntVar(&sf.maxInflight, "max-inflight", 32, "requests one connection may have in flight")
	f.BoolVar(&sf.sendfileReads, "sendfile-reads", false, "send large reads of plain volumes to TCP clients with sendfile(2) (zero-copy) instead of pread and writev (off: the copy measured faster, bench/README.md)")
	f.BoolVar(&sf.mapReads, "map-reads", true, "send large reads of plain volumes from a read-only mapping of the backing file: one copy where pread and writev make two (--map-reads=false: pread)")
	f.BoolVar(&sf.alignHomes, "align-homes", true, "encrypted volumes: when idle, move chunks that random writes left alternating between their two homes so that large requests over them are one store request again (copies, never re-seals; --align-homes=false: never)")
	f.IntVar(&sf.maxHandshakes, "max-handshakes", 1024, "connections still negotiating at once; more are closed at accept (-1: no limit)")
	f.IntVar(&sf.maxPeerHandshakes, "max-peer-handshakes", 128, "connections still negotiating at once from one peer (uid or address) (-1: no limit)")
	f.DurationVar(&sf.handshakeTimeout, "handshake-timeout", 30*time.Second, "time a client has to finish the handshake")
	f.Float64Var(&sf.attachRate, "attach-rate", 50, "attaches a second per identity (or per uid or address without a policy); beyond the burst they are refused (-1: no limit)")
	f.IntVar(&sf.attachBurst, "attach-burst", 200, "attaches an identity may make at once before --attach-rate applies")
	f.DurationVar(&sf.replyTimeout, "reply-timeout", time.Minute, "how long a reply may wait for a client that does not read before the connection is closed")
	f.StringVar(&sf.mapCache, "map-cache", "32MiB", "memory for the chunk-map nodes of all encrypted volumes together")
	f.DurationVar(&sf.shutdownTimeout, "shutdown-timeout", 30*time.Second, "how long a stop waits for in-flight requests")
	f.DurationVar(&sf.upgradeTimeout, "upgrade-timeout", 30*time.Second, "SIGUSR2: how long the new gateway has to start, and again to take the connections, before the old one rolls back")
	f.IntVar(&sf.upstreamConns, "upstream-conns", 4, "connections to an upstream backing store (nbd://…) that advertises multi-conn, per attached volume")
	f.DurationVar(&sf.outageLimit, "backing-outage-limit", 30*time.Second, "how long requests to an unreachable upstream backing store (nbd://…) wait, reconnecting, before they fail with EIO")
	f.DurationVar(&sf.leaseTTL, "lease-ttl", 20*time.Second, "time to live of the leases in Vault of encrypted volumes on upstream exports (nbd://…): a gateway that cannot renew one for 3/4 of it fences itself; a dead gateway's is taken over after 5/4 of it")
	f.StringVar(&sf.cpuProfile, "cpuprofile", "", "write a Go CPU profile of the whole run to FILE (for bench/)")
	f.MarkHidden("cpuprofile")
	f.StringVar(&sf.blockProfile, "blockprofile", "", "write a Go blocking profile (waits on locks, conditions, channels) of the whole run to FILE (for bench/)")
	f.MarkHidden("blockprofile")
	f.StringVar(&sf.memProfile, "memprofile", "", "write a Go heap profile to FILE at exit (for bench/)")
	f.MarkHidden("memprofile")
	return c
}

func newLogger(a *app, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(a.stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(a.stderr, opts)), nil
	}
	return nil, usagef("--log-format %q: want text or json", format)
}

func serve(a *app, sf serveFlags) (err error) {
	if os.Getenv("GOGC") == "" {
		// A gateway's live heap is mostly map nodes (the node cache, a
		// checkpoint's new leaves) that come and go per commit; requests
		// allocate only the nodes a cache miss reads (4 KiB each, their
		// bytes not scanned): collecting at 1.3× rather than 2× of it
		// keeps RSS down for a GC cost of about 1 % of CPU. After
		// a random 4k pass over 4 GiB of a 1 TiB volume RSS was 113–120
		// MiB at 30, 119–138 at 50, with the same IOPS (bench/scale.md).
		debug.SetGCPercent(30)
	}
	if os.Getenv("GOMAXPROCS") == "" {
		// A large pread or writev (a 1 MiB read: ~200 µs each) holds its
		// P until it returns, and the runtime hands a P on only after
		// sysmon notices: with as many Ps as CPUs the goroutine that would
		// read the next request waits meanwhile. Twice as many Ps let the
		// kernel schedule it at once: on 2 vCPUs the fio client ran ~10 %
		// more of the time in encrypted 1 MiB reads (bench/README.md).
		// The variable records it: serve in a test process doubles once.
		n := 2 * runtime.GOMAXPROCS(0)
		runtime.GOMAXPROCS(n)
		os.Setenv("GOMAXPROCS", strconv.Itoa(n))
	}
	log, err := newLogger(a, sf.logLevel, sf.logFormat)
	if err != nil {
		return err
	}
	// Started by an upgrade (SIGUSR2 to the running gateway): the old one
	// passes the listeners, then the connections (upgrade.go). Until this
	// process takes over, a failure is told to it, and nothing the old
	// one still uses (sockets, PID file) is removed here.
	uc, err := takeUpgrade()
	if err != nil {
		return err
	}
	tookOver := uc == nil
	handedOver := false // to a new gateway (SIGUSR2): leave its files alone
	if uc != nil {
		defer func() {
			if !tookOver {
				uc.fail(fmt.Errorf("the new gateway stopped: %v", err))
				uc.close()
			}
		}()
	}
	exe, exeErr := os.Executable() // what SIGUSR2 starts: the file now at this path
	// Caught from the start: a SIGTERM during start-up (a service manager
	// stopping a slow start) is a clean stop once serving, never a kill.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	tlsCfg, err := tlsConfig(sf)
	if err != nil {
		return err
	}
	if sf.tlsRequired && tlsCfg == nil {
		return usagef("--tls-required needs --tls-cert and --tls-key")
	}
	if uc == nil { // an upgrade's listeners are the old gateway's
		if err := checkListen(sf); err != nil {
			return err
		}
	}
	var pol *policyHolder
	if sf.policy != "" {
		if pol, err = loadPolicy(sf.policy, tlsCfg != nil, log); err != nil {
			return err
		}
	}
	if sf.memProfile != "" {
		defer func() {
			if mf, err := os.Create(sf.memProfile); err == nil {
				pprof.Lookup("heap").WriteTo(mf, 0)
				mf.Close()
			}
		}()
	}
	if sf.cpuProfile != "" {
		pf, err := os.Create(sf.cpuProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(pf); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	if sf.blockProfile != "" {
		runtime.SetBlockProfileRate(10_000) // a sample per 10 µs blocked
		defer func() {
			pf, err := os.Create(sf.blockProfile)
			if err == nil {
				err = errors.Join(pprof.Lookup("block").WriteTo(pf, 0), pf.Close())
			}
			if err != nil {
				log.Error("block profile", "err", err)
			}
		}()
	}
	if sf.auditOnFailure != "fail" && sf.auditOnFailure != "continue" {
		return usagef("--audit-on-failure %q: want fail or continue", sf.auditOnFailure)
	}
	registry := prometheus.NewRegistry()
	registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	smet := newServeMetrics(registry)
	a.vaultObserve = smet.observeVault
	// The audit trail: events logged anywhere (event=…) are recorded too.
	alog, err := audit.Open(a.auditDir(), audit.Options{Logger: log, Observe: smet.observeAudit})
	switch {
	case err == nil:
		a.alog = alog
		log = slog.New(audit.NewHandler(log.Handler(), alog))
		defer func() {
			if !handedOver {
				alog.Append(audit.Event{Type: audit.EvGatewayStop, Reason: "stopped"})
			}
			a.closeAudit()
		}()
	case sf.auditOnFailure == "continue":
		log.Error("audit log unavailable; serving without it (--audit-on-failure continue)", "err", err)
	default:
		return fmt.Errorf("refused to start: %w (--audit-on-failure continue to serve without it)", err)
	}
	a.log = log
	if pol != nil {
		pol.log = log // reloads go on the audit trail
	}
	reg, err := a.openRegistry()
	if err != nil {
		return err
	}
	var lockFile *os.File
	if uc != nil {
		lockFile = uc.lock // the old gateway's lock, shared: it ends with both
		if err := lockFile.Truncate(0); err == nil {
			lockFile.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		}
	} else {
		lockFile, err = lockDataDir(reg.Dir())
		if err != nil {
			return err
		}
	}
	defer lockFile.Close()
	// The PID file names the gateway that serves: a new one started by
	// an upgrade writes it once it has taken over.
	removePID := func() {}
	writePID := func() error {
		if sf.pidFile == "" {
			return nil
		}
		remove, err := writePIDFile(sf.pidFile)
		removePID = remove
		return err
	}
	defer func() {
		if !handedOver && tookOver {
			removePID()
		}
	}()
	if uc == nil {
		if err := writePID(); err != nil {
			return err
		}
	}
	access, err := parseSocketAccess(sf.unixGroup, sf.unixMode, pol != nil)
	if err != nil {
		return err
	}
	cacheBytes, err := parseSize(sf.mapCache)
	if err != nil || cacheBytes < 1<<20 {
		return usagef("--map-cache %q: want a size of at least 1MiB", sf.mapCache)
	}
	reg.SetCacheBytes(int(cacheBytes))
	if sf.outageLimit <= 0 {
		return usagef("--backing-outage-limit %s: want a positive duration", sf.outageLimit)
	}
	reg.SetOutageLimit(sf.outageLimit)
	if sf.leaseTTL < time.Second || sf.leaseTTL > 10*time.Minute {
		return usagef("--lease-ttl %s: want 1s to 10m", sf.leaseTTL)
	}
	reg.SetLeaseTTL(sf.leaseTTL)
	if sf.upstreamConns < 1 || sf.upstreamConns > 64 {
		return usagef("--upstream-conns %d: want 1 to 64", sf.upstreamConns)
	}
	reg.SetUpstreamConns(sf.upstreamConns)
	reg.SetAlignHomes(sf.alignHomes)
	vols, err := reg.List()
	if err != nil {
		return err
	}
	example := ""
	if len(vols) > 0 {
		example = vols[0].Name
	} else if sf.demo {
		v, err := reg.Create(volume.CreateOptions{Name: "demo", Size: 1 << 30, Encrypted: true})
		if errors.Is(err, volume.ErrExists) {
			err = nil
		}
		if err != nil {
			return fmt.Errorf("creating the demo volume: %w", err)
		}
		log.Info("created the demo volume, encrypted with a key in the local keystore", "event", audit.EvVolumeCreate, "volume", v.Name, "size", v.Size, "backing", reg.BackingPath(v))
		vols = append(vols, v)
		example = v.Name
	}
	warnKeystore(reg, log, vols)
	if pol == nil {
		log.Warn("no --policy: every volume is served to any client that can reach the listeners (loopback and the Unix socket only)")
	}

	exports := volume.NewExports(reg, log)
	gcfg := gateway.Config{
		Exports:       gatewayExports{exports},
		Logger:        log,
		Metrics:       gateway.NewMetrics(registry),
		MaxInflight:   sf.maxInflight,
		SendfileReads: sf.sendfileReads,
		MapReads:      sf.mapReads,
		TLS:           tlsCfg,
		TLSRequired:   sf.tlsRequired,

		HandshakeTimeout:  sf.handshakeTimeout,
		MaxHandshakes:     sf.maxHandshakes,
		MaxPeerHandshakes: sf.maxPeerHandshakes,
		AttachRate:        sf.attachRate,
		AttachBurst:       sf.attachBurst,
		ReplyTimeout:      sf.replyTimeout,
	}
	if pol != nil {
		gcfg.Policy = pol.get
	}
	if a.alog != nil {
		gcfg.Audit, gcfg.AuditContinue = a.alog, sf.auditOnFailure == "continue"
	}
	srv := gateway.New(gcfg)
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	hup := make(chan os.Signal, 1) // caught from here on: a SIGHUP never kills the gateway
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if pol != nil {
		go pol.watch(watchCtx, hup, srv)
	} else {
		go ignoreHUP(watchCtx, hup, log)
	}

	var listeners []net.Listener
	if uc == nil {
		if listeners, err = activated(); err != nil {
			return err
		}
	}
	closeAll := func() { closeListeners(listeners) }
	sock := sf.unix
	if sock == "" {
		sock = filepath.Join(reg.Dir(), "nbd.sock")
	}
	ownSocket := len(listeners) == 0 && sock != "none" && uc == nil // ours to create and remove
	if uc != nil {
		listeners = uc.nbd
		sock, ownSocket = uc.ownSocket, uc.ownSocket != ""
		if sock == "" {
			sock = "none"
		}
	} else if len(listeners) > 0 {
		log.Info("listeners passed by the service manager (socket activation): --listen and --unix are not used", "count", len(listeners))
		sock = "none"
		for _, l := range listeners {
			if l.Addr().Network() == "unix" {
				sock = l.Addr().String()
			}
		}
	} else if sf.listen != "" {
		l, err := net.Listen("tcp", sf.listen)
		if err != nil {
			return fmt.Errorf("--listen: %w", err)
		}
		listeners = append(listeners, l)
	}
	if ownSocket && uc == nil { // (an upgrade's socket exists: the old gateway made it)
		if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
			closeAll()
			return fmt.Errorf("--unix %s: %w", sock, err)
		}
		if err := removeStaleSocket(sock); err != nil {
			closeAll()
			return fmt.Errorf("--unix %s: %w", sock, err)
		}
		l, err := net.Listen("unix", sock)
		if err != nil {
			closeAll()
			return fmt.Errorf("--unix: %w", err)
		}
		listeners = append(listeners, l)
		// Who may connect: --unix-group/--unix-mode; SO_PEERCRED and the
		// policy then decide who attaches what.
		if err := access.apply(sock, log); err != nil {
			closeAll()
			return fmt.Errorf("--unix %s: %w", sock, err)
		}
	}
	if len(listeners) == 0 {
		return usagef("nothing to listen on: give --listen or --unix")
	}

	var ready atomic.Bool
	var ml net.Listener
	if uc != nil && uc.metrics != nil {
		ml = uc.metrics
	} else if sf.metrics != "" {
		if ml, err = net.Listen("tcp", sf.metrics); err != nil {
			closeAll()
			return fmt.Errorf("--metrics: %w", err)
		}
	}
	if ml != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
			var why []string
			if !ready.Load() {
				why = append(why, "not serving: starting or stopping")
			}
			why = append(why, notReady(r.Context(), a, reg, pol, sf)...)
			if len(why) > 0 {
				w.Header().Set("Content-Type", "text/plain; charset=utf-8")
				w.WriteHeader(http.StatusServiceUnavailable)
				for _, s := range why {
					fmt.Fprintln(w, s)
				}
				return
			}
			fmt.Fprintln(w, "ready")
		})
		log.Info("metrics listening", "addr", ml.Addr().String())
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go hs.Serve(ml)
		defer hs.Close()
	}

	// Key commands run here, where attached volumes are open.
	var cl net.Listener
	if uc != nil {
		cl = uc.control
	} else if cl, err = control.Listen(reg.Dir()); err != nil {
		closeAll()
		return err
	}
	keys := &volume.Keys{Reg: reg, Open: exports, Log: log, Who: "control-socket"}
	registry.MustRegister(newKeyStateCollector(keys), newMapCacheCollector(reg))
	if a.alog != nil {
		keys.Record = a.alog.Append
		if sf.auditOnFailure == "continue" {
			keys.Record = func(e audit.Event) error {
				if err := a.alog.Append(e); err != nil {
					log.Error("audit log unavailable; key operation goes ahead (--audit-on-failure continue)", "err", err)
				}
				return nil
			}
		}
	}
	if st, err := keys.Status(); err == nil {
		for _, s := range st {
			if s.Rekeying {
				log.Warn("volume has an interrupted rekey; it serves meanwhile; resume it with goldilocks key rekey",
					"volume", s.Volume, "cursor", s.RekeyCursor, "chunks", s.Chunks)
			}
		}
	}
	// A new gateway runs no control operation before it has the volumes
	// (the old one may hold them until it hands over).
	gate := control.NewGate(uc != nil)
	snaps := &volume.Snapshots{Reg: reg, Open: exports, Log: log, Record: keys.Record, Who: "control-socket"}
	cs := &http.Server{Handler: control.Handler(keys, snaps, srv.Detach, gate, log), ReadHeaderTimeout: 5 * time.Second}
	go cs.Serve(cl)
	defer func() {
		cs.Close()
		if !handedOver && tookOver {
			os.Remove(filepath.Join(reg.Dir(), control.SocketName))
		}
	}()
	renewCtx, stopRenew := context.WithCancel(context.Background())
	defer stopRenew()
	if os.Getenv("VAULT_ADDR") != "" {
		if kek, err := reg.KEK("vault"); err != nil {
			log.Warn("vault KEK provider unavailable: volumes with Vault keys will not attach", "err", err)
		} else {
			go kek.(*crypto.VaultKEK).Renew(renewCtx)
		}
	}

	if uc != nil {
		adopted, err := uc.takeOver(srv, log)
		if err != nil {
			return err
		}
		tookOver = true
		for _, c := range adopted {
			c.Start()
		}
		gate.Resume()
		if err := writePID(); err != nil {
			log.Error("upgrade: the PID file still names the old gateway", "err", err)
		}
		log.Info("upgrade: serving the listeners and connections of the old gateway", "connections", len(adopted), "open_ms", uc.adoptTook.Milliseconds())
	}
	errc := make(chan error, len(listeners)+8)
	serveNBD := func(l net.Listener) {
		log.Info("listening", "addr", l.Addr().String(), "network", l.Addr().Network())
		go func() { errc <- srv.Serve(l) }()
	}
	for _, l := range listeners {
		serveNBD(l)
	}
	usr2 := make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	defer signal.Stop(usr2)
	up := &upgrader{log: log, exe: exe, srv: srv, timeout: sf.upgradeTimeout, nbd: listeners,
		metrics: ml, control: cl, lock: lockFile, serveNBD: serveNBD, handoff: exports.SetHandoff, gate: gate, handed: make(chan struct{})}
	if ownSocket {
		up.ownSocket = sock
	}
	if a.alog != nil {
		details := map[string]any{"version": buildVersion(), "listen": sf.listen, "unix": sock, "policy": sf.policy, "tls": tlsCfg != nil}
		if err := a.alog.Append(audit.Event{Type: audit.EvGatewayStart, Reason: "started", Details: details}); err != nil {
			log.Error("audit log unavailable at start: attaches will be refused until it is writable", "err", err)
		}
	}
	ready.Store(true)
	printAttachHelp(a, log, sf, example, sock, listeners)
	notify(log, "READY=1\nSTATUS=serving")
	go watchdog(watchCtx, log, func() error { return nil })

serving:
	for {
		select {
		case s := <-sigs:
			log.Info("stopping: finishing in-flight requests", "signal", s.String())
			break serving
		case err := <-errc:
			if errors.Is(err, gateway.ErrListenerReleased) {
				continue // handed to a new gateway, or being
			}
			closeAll()
			srv.Shutdown(context.Background())
			return fmt.Errorf("serving: %w", err)
		case <-usr2:
			if exeErr != nil {
				log.Error("upgrade refused: the gateway's own path is unknown", "event", audit.EvGatewayUpgradeFailed, "err", exeErr)
				continue
			}
			go func() {
				if err := up.upgrade(); errors.Is(err, errUpgradeRunning) {
					log.Warn("SIGUSR2: an upgrade is already running")
				} else if err != nil {
					log.Error("upgrade failed: this gateway serves on", "event", audit.EvGatewayUpgradeFailed, "err", err)
				}
			}()
		case <-up.handed:
			// The new gateway serves the listeners and the handed
			// connections; what is left here (TLS sessions, handshakes)
			// finishes its requests and closes.
			handedOver = true
			ready.Store(false)
			ctx, cancel := context.WithTimeout(context.Background(), sf.shutdownTimeout)
			defer cancel()
			srv.Shutdown(ctx)
			log.Info("upgrade: handed over; this gateway exits")
			return nil
		}
	}
	ready.Store(false)
	notify(log, "STOPPING=1\nSTATUS=finishing in-flight requests")
	ctx, cancel := context.WithTimeout(context.Background(), sf.shutdownTimeout)
	defer cancel()
	go func() {
		<-sigs
		log.Warn("second signal: closing connections now")
		cancel()
	}()
	if err := srv.Shutdown(ctx); err != nil {
		return fmt.Errorf("stop: connections cut after %s: %w", sf.shutdownTimeout, err)
	}
	if ownSocket {
		os.Remove(sock)
	}
	log.Info("stopped")
	return nil
}

// notReady says why new attaches would be refused now: the audit trail
// cannot be written (unless --audit-on-failure continue), the policy file
// does not load, or Vault cannot serve a volume whose key it holds.
func notReady(ctx context.Context, a *app, reg *volume.Registry, pol *policyHolder, sf serveFlags) []string {
	var why []string
	if a.alog != nil && sf.auditOnFailure != "continue" {
		if err := a.alog.Writable(); err != nil {
			why = append(why, err.Error())
		}
	}
	if pol != nil {
		if err := pol.loadable(); err != nil {
			why = append(why, err.Error())
		}
	}
	vols, err := reg.List()
	if err != nil {
		return append(why, fmt.Sprintf("volume registry: %v", err))
	}
	for _, v := range vols {
		if v.KEK == nil || v.KEK.Provider != "vault" {
			continue
		}
		kek, err := reg.KEK("vault")
		if err == nil {
			ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err = kek.(*crypto.VaultKEK).Health(ctx)
			cancel()
		}
		if err != nil {
			why = append(why, fmt.Sprintf("volume %s needs Vault: %v", v.Name, err))
		}
		break
	}
	return why
}

// removeStaleSocket removes a socket file nobody listens on any more.
func removeStaleSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Mode()&os.ModeSocket == 0 {
		return errors.New("exists and is not a socket")
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return errors.New("another server is listening on it")
	}
	return os.Remove(path)
}

// printAttachHelp shows how to attach a volume with the configuration
// the gateway runs with: on stderr as text, or, with --log-format json,
// as one log record (stderr then holds only JSON lines).
func printAttachHelp(a *app, log *slog.Logger, sf serveFlags, name, sock string, ls []net.Listener) {
	var lines []string
	add := func(format string, args ...any) { lines = append(lines, fmt.Sprintf(format, args...)) }
	tcp := ""
	for _, l := range ls {
		if l.Addr().Network() == "tcp" {
			tcp = l.Addr().String()
		}
	}
	tlsOnly := sf.tlsRequired
	switch {
	case name == "":
		add("no volume yet: create one (it is served at once, no restart):")
		add("  goldilocks --data-dir %s volume create NAME --size 10G", a.dataDir)
	case tlsOnly:
		// QEMU's x509 credentials directory holds ca-cert.pem,
		// client-cert.pem and client-key.pem; libnbd takes the same.
		if tcp != "" {
			host, port, _ := net.SplitHostPort(tcp)
			add("  qemu-img info --object tls-creds-x509,id=tls0,dir=CLIENT_CERT_DIR,endpoint=client --image-opts driver=nbd,host=%s,port=%s,export=%s,tls-creds=tls0", host, port, name)
			add("  nbdinfo 'nbds://%s/%s?tls-certificates=CLIENT_CERT_DIR'", tcp, name)
			add("  qemu-system-x86_64 ... -object tls-creds-x509,id=tls0,dir=CLIENT_CERT_DIR,endpoint=client -drive driver=nbd,host=%s,port=%s,export=%s,tls-creds=tls0,if=virtio,cache=none", host, port, name)
		}
		if sock != "none" {
			add("  nbdinfo 'nbds+unix:///%s?socket=%s&tls-certificates=CLIENT_CERT_DIR'", name, sock)
		}
	default:
		if tcp != "" {
			host, port, _ := net.SplitHostPort(tcp)
			add("  qemu-img info nbd://%s/%s", tcp, name)
			add("  qemu-io -f raw -c 'write -P 0x5a 0 64k' -c 'read -P 0x5a 0 64k' nbd://%s/%s", tcp, name)
			add("  qemu-system-x86_64 ... -drive driver=nbd,host=%s,port=%s,export=%s,if=virtio,cache=none", host, port, name)
		}
		if sock != "none" {
			add("  nbdinfo 'nbd+unix:///%s?socket=%s'", name, sock)
		}
	}
	if sf.logFormat == "json" {
		for i := range lines {
			lines[i] = strings.TrimSpace(lines[i])
		}
		log.Info("serving", "volume", name, "attach_with", lines)
		return
	}
	w := a.stderr
	if name != "" {
		fmt.Fprintf(w, "Goldilocks is serving. Attach volume %s with:\n", name)
		if tlsOnly {
			fmt.Fprintln(w, "  (TLS is required: CLIENT_CERT_DIR holds ca-cert.pem, client-cert.pem and client-key.pem)")
		}
	} else {
		fmt.Fprintln(w, "Goldilocks is serving.")
	}
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
	fmt.Fprintln(w, "Stop with Ctrl-C.")
}
