package images

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestRepository(t *testing.T) {
	tests := []struct {
		name, image, want string
	}{
		{"a bare name is kept", "nginx", "nginx"},
		{"a tag is dropped", "ambient-mesh/echo-server:v1", "ambient-mesh/echo-server"},
		{"a digest is dropped", "ambient-mesh/echo-server@sha256:abcd", "ambient-mesh/echo-server"},
		{"a tag and a digest are both dropped", "ambient-mesh/ztunnel:v1@sha256:abcd", "ambient-mesh/ztunnel"},
		{"the docker.io registry is dropped", "docker.io/ambient-mesh/ztunnel:latest", "ambient-mesh/ztunnel"},
		{"docker.io library images match their short name", "docker.io/library/busybox:1.36", "busybox"},
		{"library/ alone is dropped", "library/busybox", "busybox"},
		{"another registry is kept", "ghcr.io/ambient-mesh/ztunnel:v1", "ghcr.io/ambient-mesh/ztunnel"},
		{"a registry port is not mistaken for a tag", "localhost:5000/echo", "localhost:5000/echo"},
		{"a registry port and a tag are told apart", "localhost:5000/echo:v2", "localhost:5000/echo"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Repository(tt.image); got != tt.want {
				t.Errorf("Repository(%q) = %q, want %q", tt.image, got, tt.want)
			}
		})
	}
}

const table = `
images:
  - image: ambient-mesh/echo-server
    entrypoint: [echo-server]
  - image: docker.io/library/busybox:latest
    entrypoint: [sh]
    args: [-c, "sleep 3600"]
  - image: ambient-mesh/noentry
`

func TestLookup(t *testing.T) {
	tab, err := Parse([]byte(table))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, image, want string
		unknown           bool
	}{
		{"an image with a tag matches its repository", "ambient-mesh/echo-server:dev", "ambient-mesh/echo-server", false},
		{"a fully qualified docker.io image matches", "docker.io/ambient-mesh/echo-server@sha256:00", "ambient-mesh/echo-server", false},
		{"a table entry written with registry and tag matches a short name", "busybox", "docker.io/library/busybox:latest", false},
		{"an image from another registry does not match", "quay.io/ambient-mesh/echo-server", "", true},
		{"an image not in the table is unknown", "nginx", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := tab.Lookup(tt.image)
			if tt.unknown {
				if !errors.Is(err, ErrUnknownImage) {
					t.Fatalf("Lookup(%q) error = %v, want ErrUnknownImage", tt.image, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if e.Image != tt.want {
				t.Errorf("Lookup(%q) = %q, want %q", tt.image, e.Image, tt.want)
			}
		})
	}
}

func TestParseRejectsBadTables(t *testing.T) {
	tests := []struct{ name, yaml string }{
		{"an entry without an image is rejected", "images:\n  - entrypoint: [x]\n"},
		{"an image listed twice under two spellings is rejected", "images:\n  - image: nginx\n  - image: docker.io/library/nginx:1\n"},
		{"text that is not YAML is rejected", "images: [\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Parse([]byte(tt.yaml)); err == nil {
				t.Error("Parse succeeded, want an error")
			}
		})
	}
}

func TestCommand(t *testing.T) {
	bin := t.TempDir()
	prog := filepath.Join(bin, "echo-server")
	if err := os.WriteFile(prog, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	upper := func(s []string) []string {
		out := make([]string, len(s))
		for i, v := range s {
			if v == "$(X)" {
				v = "x"
			}
			out[i] = v
		}
		return out
	}
	withArgs := Entry{Image: "img", Entrypoint: []string{"echo-server", "--flag"}, Args: []string{"default"}}
	tests := []struct {
		name          string
		entry         Entry
		command, args []string
		want          []string
		wantErr       error
	}{
		{"the image entrypoint and args run when the pod gives neither", withArgs, nil, nil,
			[]string{prog, "--flag", "default"}, nil},
		{"pod args replace the image args and keep the entrypoint", withArgs, nil, []string{"$(X)"},
			[]string{prog, "--flag", "x"}, nil},
		{"a pod command replaces entrypoint and image args", withArgs, []string{"/bin/sh", "-c"}, []string{"$(X)"},
			[]string{"/bin/sh", "-c", "x"}, nil},
		{"a bare command name falls back to PATH", Entry{Image: "img"}, []string{"sh"}, nil,
			[]string{mustLookPath(t, "sh")}, nil},
		{"nothing to run is an error", Entry{Image: "img"}, nil, nil, nil, ErrNoEntrypoint},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.entry.Command(tt.command, tt.args, bin, upper)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("error = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Command = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestResolveReportsMissingPrograms(t *testing.T) {
	if _, err := Resolve("no-such-program-anywhere", t.TempDir()); err == nil {
		t.Error("Resolve found a program that does not exist")
	}
}

func mustLookPath(t *testing.T, name string) string {
	t.Helper()
	p, err := Resolve(name, "")
	if err != nil {
		t.Skipf("%s not on PATH: %v", name, err)
	}
	return p
}

func TestTheClusterImageTableParses(t *testing.T) {
	tab, err := Load("../../../cluster/images.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tab.Lookup("docker.io/library/busybox:1.36"); err != nil {
		t.Errorf("busybox: %v", err)
	}
}
