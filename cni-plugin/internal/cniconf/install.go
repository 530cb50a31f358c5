package cniconf

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Defaults for Config.
const (
	DefaultDebounce = 100 * time.Millisecond
	DefaultResync   = 30 * time.Second
)

// ErrNoPrimary means the conf dir holds no usable network configuration
// yet; the primary CNI has not written it. Watch waits for it.
var ErrNoPrimary = errors.New("no primary CNI network configuration")

// extensions are the files runtimes read network configurations from
// (containerd and CRI-O via libcni's ConfFiles), picking the first by name.
var extensions = []string{".conf", ".conflist", ".json"}

// Config says where to install and what to write.
type Config struct {
	// ConfDir is the node's CNI configuration directory (/etc/cni/net.d, as
	// mounted into the agent).
	ConfDir string
	// Entry is our plugin's settings in the conflist.
	Entry Entry
	// Debounce is how long Watch lets a burst of changes settle before
	// re-inserting; Resync is how often it checks without any event, in case
	// one was missed. Zero means the default.
	Debounce time.Duration
	Resync   time.Duration
	Log      *slog.Logger
}

// Installer keeps ambient-cni in the node's primary CNI configuration.
type Installer struct {
	cfg Config
	log *slog.Logger
}

// New returns an installer for cfg.
func New(cfg Config) *Installer {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = DefaultDebounce
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	return &Installer{cfg: cfg, log: log}
}

// configFiles lists the configuration files in dir, sorted by name as
// runtimes sort them.
func configFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", dir, err)
	}
	var files []string
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if slices.Contains(extensions, filepath.Ext(e.Name())) {
			files = append(files, filepath.Join(dir, e.Name()))
		}
	}
	slices.Sort(files)
	return files, nil
}

// primary finds the configuration the runtime uses: the first file by name
// that parses as a network configuration. Unusable files are skipped, as
// CRI-O does.
func (in *Installer) primary() (path string, obj object, k kind, data []byte, err error) {
	files, err := configFiles(in.cfg.ConfDir)
	if err != nil {
		return "", nil, kindInvalid, nil, err
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // removed since the listing
			}
			return "", nil, kindInvalid, nil, fmt.Errorf("reading %s: %w", f, err)
		}
		obj, k, err := parseConfig(data)
		if err != nil {
			in.log.Warn("skipping unusable CNI config", "file", f, "error", err)
			continue
		}
		return f, obj, k, data, nil
	}
	return "", nil, kindInvalid, nil, fmt.Errorf("%w in %s", ErrNoPrimary, in.cfg.ConfDir)
}

// Install puts our entry last in the primary configuration and returns that
// file's path. A single-plugin .conf (or .json) is converted into a
// .conflist of the same name, which replaces it. Nothing is written when
// the entry is already in place.
func (in *Installer) Install() (string, error) {
	path, obj, k, data, err := in.primary()
	if err != nil {
		return "", err
	}
	target := path
	if k == kindConf {
		obj = toConflist(obj)
		target = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	}
	out, changed, err := insert(obj, in.cfg.Entry)
	if err != nil {
		return "", fmt.Errorf("inserting into %s: %w", path, err)
	}
	if !changed && target == path {
		return path, nil
	}
	b, err := format(out.marshal())
	if err != nil {
		return "", fmt.Errorf("formatting %s: %w", target, err)
	}
	if target == path && bytes.Equal(b, data) {
		return path, nil
	}
	if err := writeAtomic(target, b, path); err != nil {
		return "", err
	}
	if target != path {
		// The conflist has the .conf's name plus "list", so it sorts right
		// after it; with the .conf gone the runtime picks the conflist.
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("removing %s after converting it: %w", path, err)
		}
		in.log.Info("converted CNI config to a conflist", "from", path, "to", target)
	}
	in.log.Info("inserted ambient-cni into CNI config", "file", target)
	return target, nil
}

// Uninstall removes our entry from every configuration file in the conf
// dir, leaving everything else as it was.
func (in *Installer) Uninstall() error {
	files, err := configFiles(in.cfg.ConfDir)
	if err != nil {
		return err
	}
	var errs []error
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("reading %s: %w", f, err))
			}
			continue
		}
		obj, k, err := parseConfig(data)
		if err != nil || k != kindConflist {
			continue
		}
		out, changed, err := remove(obj)
		if err != nil {
			errs = append(errs, fmt.Errorf("removing ambient-cni from %s: %w", f, err))
			continue
		}
		if !changed {
			continue
		}
		b, err := format(out.marshal())
		if err == nil {
			err = writeAtomic(f, b, f)
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		in.log.Info("removed ambient-cni from CNI config", "file", f)
	}
	return errors.Join(errs...)
}

// Watch keeps our entry in place until ctx ends: whenever files in the
// conf dir change (the primary CNI rewrote its config, or wrote it for the
// first time) and every Resync, it runs Install. Changes are debounced so a
// burst of writes is handled once. Install errors are logged, not fatal:
// the next change or resync tries again. ctx ending is a clean exit.
func (in *Installer) Watch(ctx context.Context) error {
	if err := os.MkdirAll(in.cfg.ConfDir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", in.cfg.ConfDir, err)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching %s: %w", in.cfg.ConfDir, err)
	}
	defer w.Close()
	if err := w.Add(in.cfg.ConfDir); err != nil {
		return fmt.Errorf("watching %s: %w", in.cfg.ConfDir, err)
	}

	in.reconcile()
	debounce := time.NewTimer(in.cfg.Debounce)
	debounce.Stop()
	resync := time.NewTicker(in.cfg.Resync)
	defer resync.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("conf dir watcher stopped")
			}
			if strings.HasPrefix(filepath.Base(ev.Name), ".") {
				continue // our own temporary files
			}
			debounce.Reset(in.cfg.Debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("conf dir watcher stopped")
			}
			// An overflow loses events; a full pass makes up for them.
			in.log.Warn("watching CNI conf dir", "error", err)
			debounce.Reset(in.cfg.Debounce)
		case <-debounce.C:
			in.reconcile()
		case <-resync.C:
			in.reconcile()
		}
	}
}

func (in *Installer) reconcile() {
	if _, err := in.Install(); err != nil {
		if errors.Is(err, ErrNoPrimary) {
			in.log.Info("waiting for the primary CNI config", "dir", in.cfg.ConfDir)
			return
		}
		in.log.Error("installing ambient-cni into CNI config", "error", err)
	}
}

// writeAtomic writes data to path through a temporary file in the same
// directory and a rename, so a runtime never reads a half-written file. The
// new file takes the mode and owner of modeFrom (0644 if it is gone).
func writeAtomic(path string, data []byte, modeFrom string) (err error) {
	mode := fs.FileMode(0o644)
	uid, gid := -1, -1
	if fi, err := os.Stat(modeFrom); err == nil {
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("setting mode of %s: %w", path, err)
	}
	if uid >= 0 && os.Geteuid() == 0 {
		if err := f.Chown(uid, gid); err != nil {
			return fmt.Errorf("setting owner of %s: %w", path, err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("replacing %s: %w", path, err)
	}
	return nil
}

// InstallBinary copies the plugin binary at src into binDir as
// ambient-cni, atomically (a runtime executing the old binary keeps it),
// and returns the installed path. An identical binary is left alone.
func InstallBinary(src, binDir string) (dst string, err error) {
	dst = filepath.Join(binDir, PluginType)
	in, err := os.Open(src)
	if err != nil {
		return "", fmt.Errorf("opening plugin binary: %w", err)
	}
	defer in.Close()
	if same, err := sameContent(in, dst); err != nil {
		return "", err
	} else if same {
		return dst, nil
	}
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return "", fmt.Errorf("creating %s: %w", binDir, err)
	}
	f, err := os.CreateTemp(binDir, "."+PluginType+".*.tmp")
	if err != nil {
		return "", fmt.Errorf("installing plugin binary: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err = io.Copy(f, in); err != nil {
		return "", fmt.Errorf("copying plugin binary: %w", err)
	}
	if err = f.Chmod(0o755); err != nil {
		return "", fmt.Errorf("making plugin binary executable: %w", err)
	}
	if err = f.Sync(); err != nil {
		return "", fmt.Errorf("syncing plugin binary: %w", err)
	}
	if err = f.Close(); err != nil {
		return "", fmt.Errorf("installing plugin binary: %w", err)
	}
	if err = os.Rename(f.Name(), dst); err != nil {
		return "", fmt.Errorf("installing plugin binary: %w", err)
	}
	return dst, nil
}

// sameContent reports whether dst already holds what src holds, leaving
// src rewound.
func sameContent(src *os.File, dst string) (bool, error) {
	defer src.Seek(0, io.SeekStart)
	want, err := io.ReadAll(src)
	if err != nil {
		return false, fmt.Errorf("reading plugin binary: %w", err)
	}
	have, err := os.ReadFile(dst)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading installed plugin binary: %w", err)
	}
	return bytes.Equal(want, have), nil
}

// RemoveBinary deletes the installed plugin binary; a missing one is fine.
func RemoveBinary(binDir string) error {
	if err := os.Remove(filepath.Join(binDir, PluginType)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing plugin binary: %w", err)
	}
	return nil
}
