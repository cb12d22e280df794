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
	"runtime/debug"
	"runtime/pprof"
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
	listen, unix, metrics, policy string
	tlsCert, tlsKey, tlsCA        string
	tlsMinVersion                 string
	auditOnFailure                string
	tlsRequired                   bool
	logLevel, logFormat           string
	maxInflight                   int
	mapCache                      string
	shutdownTimeout               time.Duration
	cpuProfile                    string
	memProfile                    string
}

func newServeCmd(a *app) *cobra.Command {
	var sf serveFlags
	c := &cobra.Command{
		Use:   "serve",
		Short: "Run the NBD gateway",
		Long: `Run the NBD gateway. Export names are volume names:
  nbd://127.0.0.1:10809/NAME   or   nbd+unix:///NAME?socket=DATA_DIR/nbd.sock
With no volume in the data dir, a 1 GiB volume named "demo" is created.
SIGINT or SIGTERM stops accepting, finishes in-flight requests, flushes and exits 0.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyConfig(a, cmd); err != nil {
				return err
			}
			return serve(a, sf)
		},
	}
	f := c.Flags()
	f.StringVar(&sf.listen, "listen", "127.0.0.1:10809", "TCP address for NBD (empty: none)")
	f.StringVar(&sf.unix, "unix", "", "Unix socket for NBD (default DATA_DIR/nbd.sock; \"none\": none)")
	f.StringVar(&sf.metrics, "metrics", "127.0.0.1:9810", "address for Prometheus /metrics, /healthz, /readyz (empty: none)")
	f.StringVar(&sf.policy, "policy", "", "access policy file (YAML)")
	f.StringVar(&sf.tlsCert, "tls-cert", "", "server certificate (PEM)")
	f.StringVar(&sf.tlsKey, "tls-key", "", "server private key (PEM)")
	f.StringVar(&sf.tlsCA, "tls-ca", "", "CA that signs client certificates (PEM)")
	f.BoolVar(&sf.tlsRequired, "tls-required", false, "refuse clients that do not start TLS (NBD_REP_ERR_TLS_REQD)")
	f.StringVar(&sf.tlsMinVersion, "tls-min-version", "1.2", "oldest TLS version accepted: 1.2 or 1.3 (1.3 is preferred when the client has it)")
	f.StringVar(&sf.auditOnFailure, "audit-on-failure", "fail", "when the audit log cannot be written: fail (refuse attaches and key operations) or continue")
	f.StringVar(&sf.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&sf.logFormat, "log-format", "text", "text or json")
	f.IntVar(&sf.maxInflight, "max-inflight", 32, "requests one connection may have in flight")
	f.StringVar(&sf.mapCache, "map-cache", "32MiB", "memory for the chunk-map nodes of all encrypted volumes together")
	f.DurationVar(&sf.shutdownTimeout, "shutdown-timeout", 30*time.Second, "how long a stop waits for in-flight requests")
	f.StringVar(&sf.cpuProfile, "cpuprofile", "", "write a Go CPU profile of the whole run to FILE (for bench/)")
	f.MarkHidden("cpuprofile")
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

func serve(a *app, sf serveFlags) error {
	if os.Getenv("GOGC") == "" {
		// A gateway's live heap is mostly map state that comes and goes
		// per commit; collecting at 1.5× rather than 2× of it keeps RSS
		// down for a GC cost below 1% of CPU (bench/scale.md).
		debug.SetGCPercent(50)
	}
	log, err := newLogger(a, sf.logLevel, sf.logFormat)
	if err != nil {
		return err
	}
	tlsCfg, err := tlsConfig(sf)
	if err != nil {
		return err
	}
	if sf.tlsRequired && tlsCfg == nil {
		return usagef("--tls-required needs --tls-cert and --tls-key")
	}
	if err := checkListen(sf); err != nil {
		return err
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
	if sf.auditOnFailure != "fail" && sf.auditOnFailure != "continue" {
		return usagef("--audit-on-failure %q: want fail or continue", sf.auditOnFailure)
	}
	// The audit trail: events logged anywhere (event=…) are recorded too.
	alog, err := audit.Open(a.auditDir(), audit.Options{Logger: log})
	switch {
	case err == nil:
		a.alog = alog
		log = slog.New(audit.NewHandler(log.Handler(), alog))
		defer func() {
			alog.Append(audit.Event{Type: audit.EvGatewayStop, Reason: "stopped"})
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
	cacheBytes, err := parseSize(sf.mapCache)
	if err != nil || cacheBytes < 1<<20 {
		return usagef("--map-cache %q: want a size of at least 1MiB", sf.mapCache)
	}
	reg.SetCacheBytes(int(cacheBytes))
	vols, err := reg.List()
	if err != nil {
		return err
	}
	example := "demo"
	if len(vols) > 0 {
		example = vols[0].Name
	} else {
		v, err := reg.Create(volume.CreateOptions{Name: "demo", Size: 1 << 30, Encrypted: true})
		if errors.Is(err, volume.ErrExists) {
			err = nil
		}
		if err != nil {
			return fmt.Errorf("creating the demo volume: %w", err)
		}
		log.Info("created the demo volume, encrypted with a key in the local keystore", "event", audit.EvVolumeCreate, "volume", v.Name, "size", v.Size, "backing", reg.BackingPath(v))
		vols = append(vols, v)
	}
	warnKeystore(reg, log, vols)
	if pol == nil {
		log.Warn("no --policy: every volume is served to any client that can reach the listeners (loopback and the Unix socket only)")
	}

	registry := prometheus.NewRegistry()
	registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exports := volume.NewExports(reg, log)
	gcfg := gateway.Config{
		Exports:     gatewayExports{exports},
		Logger:      log,
		Metrics:     gateway.NewMetrics(registry),
		MaxInflight: sf.maxInflight,
		TLS:         tlsCfg,
		TLSRequired: sf.tlsRequired,
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
	closeAll := func() {
		for _, l := range listeners {
			l.Close()
		}
	}
	if sf.listen != "" {
		l, err := net.Listen("tcp", sf.listen)
		if err != nil {
			return fmt.Errorf("--listen: %w", err)
		}
		listeners = append(listeners, l)
	}
	sock := sf.unix
	if sock == "" {
		sock = filepath.Join(reg.Dir(), "nbd.sock")
	}
	if sock != "none" {
		if err := removeStaleSocket(sock); err != nil {
			closeAll()
			return fmt.Errorf("--unix %s: %w", sock, err)
		}
		l, err := net.Listen("unix", sock)
		if err != nil {
			closeAll()
			return fmt.Errorf("--unix: %w", err)
		}
		// With a policy, any local user may connect and SO_PEERCRED decides;
		// without one, only the gateway's user.
		mode := os.FileMode(0o600)
		if pol != nil {
			mode = 0o666
		}
		if err := os.Chmod(sock, mode); err != nil {
			closeAll()
			return fmt.Errorf("--unix: %w", err)
		}
		listeners = append(listeners, l)
	}
	if len(listeners) == 0 {
		return usagef("nothing to listen on: give --listen or --unix")
	}

	var ready atomic.Bool
	if sf.metrics != "" {
		ml, err := net.Listen("tcp", sf.metrics)
		if err != nil {
			closeAll()
			return fmt.Errorf("--metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
			if !ready.Load() {
				http.Error(w, "not ready", http.StatusServiceUnavailable)
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
	cl, err := control.Listen(reg.Dir())
	if err != nil {
		closeAll()
		return err
	}
	keys := &volume.Keys{Reg: reg, Open: exports, Log: log, Who: "control-socket"}
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
	cs := &http.Server{Handler: control.Handler(keys, log), ReadHeaderTimeout: 5 * time.Second}
	go cs.Serve(cl)
	defer func() {
		cs.Close()
		os.Remove(filepath.Join(reg.Dir(), control.SocketName))
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

	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		log.Info("listening", "addr", l.Addr().String(), "network", l.Addr().Network())
		go func() { errc <- srv.Serve(l) }()
	}
	if a.alog != nil {
		details := map[string]any{"version": version, "listen": sf.listen, "unix": sock, "policy": sf.policy, "tls": tlsCfg != nil}
		if err := a.alog.Append(audit.Event{Type: audit.EvGatewayStart, Reason: "started", Details: details}); err != nil {
			log.Error("audit log unavailable at start: attaches will be refused until it is writable", "err", err)
		}
	}
	ready.Store(true)
	printAttachHelp(a, example, sock, listeners)

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sigs:
		log.Info("stopping: finishing in-flight requests", "signal", s.String())
	case err := <-errc:
		closeAll()
		srv.Shutdown(context.Background())
		return fmt.Errorf("serving: %w", err)
	}
	ready.Store(false)
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
	if sock != "none" {
		os.Remove(sock)
	}
	log.Info("stopped")
	return nil
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

func printAttachHelp(a *app, name, sock string, ls []net.Listener) {
	tcp := ""
	for _, l := range ls {
		if l.Addr().Network() == "tcp" {
			tcp = l.Addr().String()
		}
	}
	w := a.stderr
	fmt.Fprintf(w, "Goldilocks is serving. Attach volume %s with:\n", name)
	if tcp != "" {
		host, port, _ := net.SplitHostPort(tcp)
		fmt.Fprintf(w, "  qemu-img info nbd://%s/%s\n", tcp, name)
		fmt.Fprintf(w, "  qemu-io -f raw -c 'write -P 0x5a 0 64k' -c 'read -P 0x5a 0 64k' nbd://%s/%s\n", tcp, name)
		fmt.Fprintf(w, "  qemu-system-x86_64 ... -drive driver=nbd,host=%s,port=%s,export=%s,if=virtio,cache=none\n", host, port, name)
	}
	if sock != "none" {
		fmt.Fprintf(w, "  nbdinfo 'nbd+unix:///%s?socket=%s'\n", name, sock)
	}
	fmt.Fprintln(w, "Stop with Ctrl-C.")
}
