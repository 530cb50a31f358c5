package volume

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The atomic writer's layout, as in the kubelet's pkg/volume/util.AtomicWriter:
// the payload lives in a timestamped directory, dataDirName is a symlink to
// it, and every top-level user-visible name is a symlink through dataDirName.
// An update writes a new timestamped directory and renames a fresh symlink
// over dataDirName, so a reader sees the old payload or the new one, never a
// mix or a half-written file.
const (
	dataDirName    = "..data"
	newDataDirName = "..data_tmp"
)

// file is one file of a volume's payload.
type file struct {
	data []byte
	mode fs.FileMode
}

// writeAtomic makes dir hold exactly payload (relative path -> file) and
// reports whether anything changed.
func writeAtomic(dir string, payload map[string]file) (changed bool, err error) {
	for p := range payload {
		if err := validatePath(p); err != nil {
			return false, err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, fmt.Errorf("creating volume dir: %w", err)
	}
	dataLink := filepath.Join(dir, dataDirName)
	oldTs, err := os.Readlink(dataLink)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("reading data link: %w", err)
	}

	write := true
	if oldTs != "" {
		same, err := sameContents(filepath.Join(dir, oldTs), payload)
		if err != nil {
			return false, err
		}
		write = !same
	}
	if write {
		tsDir, err := os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05."))
		if err != nil {
			return false, fmt.Errorf("creating data dir: %w", err)
		}
		if err := writePayload(tsDir, payload); err != nil {
			os.RemoveAll(tsDir)
			return false, err
		}
		tmpLink := filepath.Join(dir, newDataDirName)
		os.Remove(tmpLink) // left over from an interrupted write
		if err := os.Symlink(filepath.Base(tsDir), tmpLink); err != nil {
			os.RemoveAll(tsDir)
			return false, fmt.Errorf("linking new data dir: %w", err)
		}
		if err := os.Rename(tmpLink, dataLink); err != nil {
			os.Remove(tmpLink)
			os.RemoveAll(tsDir)
			return false, fmt.Errorf("swapping data link: %w", err)
		}
	}

	// User-visible links: created after the swap (they point through
	// ..data), stale ones removed, always checked so a crash between steps
	// heals on the next write.
	visible := map[string]bool{}
	for p := range payload {
		top, _, _ := strings.Cut(p, "/")
		visible[top] = true
	}
	for top := range visible {
		link := filepath.Join(dir, top)
		want := filepath.Join(dataDirName, top)
		if got, err := os.Readlink(link); err == nil && got == want {
			continue
		}
		if err := os.RemoveAll(link); err != nil {
			return write, fmt.Errorf("replacing %s: %w", top, err)
		}
		if err := os.Symlink(want, link); err != nil {
			return write, fmt.Errorf("linking %s: %w", top, err)
		}
		changed = true
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return write, fmt.Errorf("reading volume dir: %w", err)
	}
	newTs, _ := os.Readlink(dataLink)
	for _, e := range entries {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, ".."):
			// Old data dirs: everything but the current one goes.
			if name == dataDirName || name == newTs {
				continue
			}
			if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
				return write, fmt.Errorf("removing old data dir: %w", err)
			}
		case !visible[name] && e.Type()&fs.ModeSymlink != 0:
			// Only links are ours; a real directory here is a mount target
			// Mounts created for a nested volumeMount, and must stay.
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				return write, fmt.Errorf("removing stale %s: %w", name, err)
			}
			changed = true
		}
	}
	return write || changed, nil
}

// validatePath rejects payload paths that could leave the volume or clash
// with the writer's own names.
func validatePath(p string) error {
	if p == "" || filepath.IsAbs(p) || strings.HasPrefix(p, "..") {
		return fmt.Errorf("invalid file path %q", p)
	}
	for _, el := range strings.Split(p, "/") {
		if el == ".." || el == "" {
			return fmt.Errorf("invalid file path %q", p)
		}
	}
	return nil
}

func writePayload(tsDir string, payload map[string]file) error {
	if err := os.Chmod(tsDir, 0o755); err != nil {
		return fmt.Errorf("setting data dir mode: %w", err)
	}
	for p, f := range payload {
		full := filepath.Join(tsDir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return fmt.Errorf("creating dir for %s: %w", p, err)
		}
		if err := os.WriteFile(full, f.data, f.mode); err != nil {
			return fmt.Errorf("writing %s: %w", p, err)
		}
		if err := os.Chmod(full, f.mode); err != nil { // WriteFile's mode is subject to umask
			return fmt.Errorf("setting mode of %s: %w", p, err)
		}
	}
	return nil
}

// sameContents reports whether tsDir holds exactly payload, modes included.
func sameContents(tsDir string, payload map[string]file) (bool, error) {
	seen := 0
	same := true
	err := filepath.WalkDir(tsDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(tsDir, path)
		want, ok := payload[filepath.ToSlash(rel)]
		if !ok {
			same = false
			return fs.SkipAll
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if info.Mode().Perm() != want.mode.Perm() {
			same = false
			return fs.SkipAll
		}
		got, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, want.data) {
			same = false
			return fs.SkipAll
		}
		seen++
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading current payload: %w", err)
	}
	return same && seen == len(payload), nil
}
