package cniconf

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/*/want")

var testEntry = Entry{AgentSocket: "/var/run/ambient/cni.sock"}

// copyIn copies testdata/<name>/in into a fresh conf dir; modes are set
// here because git does not keep them.
func copyIn(t *testing.T, name string, modes map[string]os.FileMode) string {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join("testdata", name, "in")
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		mode := os.FileMode(0o644)
		if m, ok := modes[e.Name()]; ok {
			mode = m
		}
		dst := filepath.Join(dir, e.Name())
		if err := os.WriteFile(dst, b, mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(dst, mode)
	}
	return dir
}

// snapshot reads every file in dir.
func snapshot(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		files[e.Name()] = b
	}
	return files
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// pluginsOf parses the plugins list of a conflist file, or wraps a single
// conf, as a runtime would see it.
func pluginsOf(t *testing.T, b []byte) []any {
	t.Helper()
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("parsing %s: %v", b, err)
	}
	if p, ok := doc["plugins"].([]any); ok {
		return p
	}
	return []any{doc}
}

func types(plugins []any) []string {
	var out []string
	for _, p := range plugins {
		out = append(out, p.(map[string]any)["type"].(string))
	}
	return out
}

func TestInstallGolden(t *testing.T) {
	tests := []struct {
		name       string
		modes      map[string]os.FileMode
		wantFile   string // the file that ends up holding our entry
		wantRemove string // a file Install replaces
		wantTypes  []string
	}{
		{name: "bridge-portmap", wantFile: "10-ambk.conflist", wantTypes: []string{"bridge", "portmap", PluginType}},
		{name: "calico", wantFile: "10-calico.conflist", wantTypes: []string{"calico", "portmap", "bandwidth", PluginType}},
		{name: "flannel", modes: map[string]os.FileMode{"10-flannel.conf": 0o600}, wantFile: "10-flannel.conflist", wantRemove: "10-flannel.conf", wantTypes: []string{"flannel", PluginType}},
		{name: "existing-entry", wantFile: "05-cilium.conflist", wantTypes: []string{"cilium-cni", "portmap", PluginType}},
		{name: "skips-unusable", wantFile: "10-bridge.conflist", wantTypes: []string{"bridge", PluginType}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := copyIn(t, tt.name, tt.modes)
			before := snapshot(t, dir)
			srcName := tt.wantFile
			if tt.wantRemove != "" {
				srcName = tt.wantRemove
			}
			srcInfo, _ := os.Stat(filepath.Join(dir, srcName))
			in := New(Config{ConfDir: dir, Entry: testEntry})

			got, err := in.Install()
			if err != nil {
				t.Fatalf("Install: %v", err)
			}
			if got != filepath.Join(dir, tt.wantFile) {
				t.Fatalf("Install wrote %s, want %s", got, tt.wantFile)
			}
			after := snapshot(t, dir)
			checkGolden(t, filepath.Join("testdata", tt.name, "want"), after)

			if _, ok := after[tt.wantRemove]; tt.wantRemove != "" && ok {
				t.Fatalf("%s still present after conversion", tt.wantRemove)
			}
			for name, b := range before {
				if name != tt.wantFile && name != tt.wantRemove && !bytes.Equal(after[name], b) {
					t.Fatalf("Install touched %s", name)
				}
			}
			plugins := pluginsOf(t, after[tt.wantFile])
			if gotTypes := types(plugins); !slices.Equal(gotTypes, tt.wantTypes) {
				t.Fatalf("plugin types %v, want %v", gotTypes, tt.wantTypes)
			}
			if last := plugins[len(plugins)-1].(map[string]any); last["agentSocket"] != testEntry.AgentSocket {
				t.Fatalf("our entry is %v", last)
			}
			fi, _ := os.Stat(got)
			if fi.Mode() != srcInfo.Mode() {
				t.Fatalf("mode %v, want the original %v", fi.Mode(), srcInfo.Mode())
			}
			if leftovers, _ := filepath.Glob(filepath.Join(dir, ".*")); len(leftovers) > 0 {
				t.Fatalf("temporary files left: %v", leftovers)
			}

			// Installing again is a no-op: same file, not even rewritten.
			ino := inode(t, got)
			if again, err := in.Install(); err != nil || again != got {
				t.Fatalf("second Install: %s, %v", again, err)
			}
			if inode(t, got) != ino || !reflect.DeepEqual(snapshot(t, dir), after) {
				t.Fatal("second Install rewrote the config")
			}

			// Uninstall leaves the primary's plugin list as it was.
			if err := in.Uninstall(); err != nil {
				t.Fatalf("Uninstall: %v", err)
			}
			restored := pluginsOf(t, snapshot(t, dir)[tt.wantFile])
			var original []any
			for _, p := range pluginsOf(t, before[srcName]) {
				if p.(map[string]any)["type"] != PluginType {
					original = append(original, p)
				}
			}
			if !reflect.DeepEqual(restored, original) {
				t.Fatalf("after Uninstall plugins are\n%v\nwant\n%v", restored, original)
			}
			ino = inode(t, got)
			if err := in.Uninstall(); err != nil || inode(t, got) != ino {
				t.Fatalf("second Uninstall: %v (rewrote: %v)", err, inode(t, got) != ino)
			}
		})
	}
}

func checkGolden(t *testing.T, wantDir string, got map[string][]byte) {
	t.Helper()
	if *update {
		os.RemoveAll(wantDir)
		if err := os.MkdirAll(wantDir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, b := range got {
			if err := os.WriteFile(filepath.Join(wantDir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return
	}
	want := snapshot(t, wantDir)
	for name := range want {
		if _, ok := got[name]; !ok {
			t.Errorf("missing file %s", name)
		}
	}
	for name, b := range got {
		w, ok := want[name]
		if !ok {
			t.Errorf("unexpected file %s", name)
			continue
		}
		if !bytes.Equal(b, w) {
			t.Errorf("%s differs from %s/%s (run with -update to accept):\n%s", name, wantDir, name, b)
		}
	}
}

func TestInstallWithoutAnyConfigWaitsForThePrimary(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "00-broken.conflist"), []byte("{"), 0o644)
	if _, err := New(Config{ConfDir: dir}).Install(); !errors.Is(err, ErrNoPrimary) {
		t.Fatalf("Install with no usable config: %v, want ErrNoPrimary", err)
	}
	if _, err := New(Config{ConfDir: filepath.Join(dir, "absent")}).Install(); !errors.Is(err, ErrNoPrimary) {
		t.Fatalf("Install with no conf dir: %v, want ErrNoPrimary", err)
	}
}

func TestChangedSettingsUpdateTheEntryInPlace(t *testing.T) {
	dir := copyIn(t, "bridge-portmap", nil)
	path, err := New(Config{ConfDir: dir, Entry: Entry{AgentSocket: "/a.sock", LogLevel: "debug"}}).Install()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{ConfDir: dir, Entry: Entry{AgentSocket: "/b.sock"}}).Install(); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	plugins := pluginsOf(t, b)
	want := map[string]any{"type": PluginType, "agentSocket": "/b.sock"}
	if got := plugins[len(plugins)-1]; !reflect.DeepEqual(got, want) || len(plugins) != 3 {
		t.Fatalf("plugins %v, want one entry of ours equal to %v", plugins, want)
	}
}

// TestWatchKeepsTheEntryThroughRewrites asserts on the files it ends with,
// not on how fast Watch reacts.
func TestWatchKeepsTheEntryThroughRewrites(t *testing.T) {
	dir := t.TempDir()
	in := New(Config{ConfDir: dir, Entry: testEntry, Debounce: 5 * time.Millisecond, Resync: 50 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Watch(ctx) }()

	primary := filepath.Join(dir, "10-ambk.conflist")
	original, err := os.ReadFile(filepath.Join("testdata", "bridge-portmap", "in", "10-ambk.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	waitForTypes := func(path string, want ...string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			b, err := os.ReadFile(path)
			if err == nil {
				var doc struct{ Plugins []struct{ Type string } }
				if json.Unmarshal(b, &doc) == nil {
					var got []string
					for _, p := range doc.Plugins {
						got = append(got, p.Type)
					}
					if slices.Equal(got, want) {
						return
					}
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never held plugins %v; last content: %s", filepath.Base(path), want, b)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	// The primary CNI writes its config after the agent started.
	if err := os.WriteFile(primary, original, 0o644); err != nil {
		t.Fatal(err)
	}
	waitForTypes(primary, "bridge", "portmap", PluginType)

	// It rewrites the file (a restart of its daemon), dropping our entry,
	// several times in a burst.
	for range 5 {
		if err := os.WriteFile(primary, original, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	waitForTypes(primary, "bridge", "portmap", PluginType)

	// It replaces the file atomically with a changed chain.
	changed := strings.Replace(string(original), `"portmap"`, `"bandwidth"`, 1)
	tmp := filepath.Join(dir, "tmp-write")
	os.WriteFile(tmp, []byte(changed), 0o644)
	if err := os.Rename(tmp, primary); err != nil {
		t.Fatal(err)
	}
	waitForTypes(primary, "bridge", "bandwidth", PluginType)

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Watch after cancel: %v, want a clean exit", err)
	}
	b, _ := os.ReadFile(primary)
	if strings.Count(string(b), PluginType) != 1 {
		t.Fatalf("final config holds our entry %d times:\n%s", strings.Count(string(b), PluginType), b)
	}
}

func TestInstallBinary(t *testing.T) {
	src := filepath.Join(t.TempDir(), "ambient-cni")
	os.WriteFile(src, []byte("v1 binary"), 0o700)
	binDir := filepath.Join(t.TempDir(), "opt", "cni", "bin")

	dst, err := InstallBinary(src, binDir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dst)
	if err != nil || fi.Mode().Perm() != 0o755 || filepath.Base(dst) != PluginType {
		t.Fatalf("installed %s: %v, %v", dst, fi.Mode(), err)
	}
	ino := inode(t, dst)
	if _, err := InstallBinary(src, binDir); err != nil || inode(t, dst) != ino {
		t.Fatalf("reinstalling the same binary: %v (rewritten: %v)", err, inode(t, dst) != ino)
	}

	// A runtime still running the old binary keeps its copy.
	old, _ := os.Open(dst)
	defer old.Close()
	os.WriteFile(src, []byte("v2 binary"), 0o700)
	if _, err := InstallBinary(src, binDir); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(dst); string(b) != "v2 binary" {
		t.Fatalf("installed %q, want v2", b)
	}
	if b := make([]byte, 9); func() bool { n, _ := old.Read(b); return string(b[:n]) != "v1 binary" }() {
		t.Fatal("the old binary was overwritten in place")
	}
	if leftovers, _ := filepath.Glob(filepath.Join(binDir, ".*")); len(leftovers) > 0 {
		t.Fatalf("temporary files left: %v", leftovers)
	}
	if err := RemoveBinary(binDir); err != nil {
		t.Fatal(err)
	}
	if err := RemoveBinary(binDir); err != nil {
		t.Fatalf("removing twice: %v", err)
	}
	if _, err := InstallBinary(filepath.Join(t.TempDir(), "missing"), binDir); err == nil {
		t.Fatal("installing a missing binary succeeded")
	}
}

func FuzzInsertRemove(f *testing.F) {
	for _, name := range []string{"bridge-portmap", "calico", "existing-entry"} {
		files, _ := filepath.Glob(filepath.Join("testdata", name, "in", "*.conflist"))
		for _, file := range files {
			b, _ := os.ReadFile(file)
			f.Add(b)
		}
	}
	f.Add([]byte(`{"plugins":[{"type":"a"},{"type":"ambient-cni"}],"a":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		obj, k, err := parseConfig(data)
		if err != nil || k != kindConflist {
			return
		}
		ins, _, err := insert(obj, testEntry)
		if err != nil {
			t.Fatalf("insert: %v", err)
		}
		b, err := format(ins.marshal())
		if err != nil {
			t.Fatalf("formatting inserted: %v", err)
		}
		reparsed, k, err := parseConfig(b)
		if err != nil || k != kindConflist {
			t.Fatalf("inserted config does not parse: %v\n%s", err, b)
		}
		if _, changed, _ := insert(reparsed, testEntry); changed {
			t.Fatalf("insert is not idempotent on\n%s", b)
		}
		a, _, _ := remove(obj)
		r, _, _ := remove(reparsed)
		if !jsonEqual(a.marshal(), r.marshal()) {
			t.Fatalf("remove(insert(x)) != remove(x):\n%s\n%s", r.marshal(), a.marshal())
		}
	})
}
