// Package images maps container image names to local programs: the local
// cluster has no registry and no container images, so each image a pod names
// is looked up in a table (e2e/cluster/images.yaml) that says which binary
// plays it.
package images

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"
)

// ErrUnknownImage is returned (wrapped) by Lookup when the table has no entry
// for an image; nodelet reports it as ErrImagePull.
var ErrUnknownImage = errors.New("image is not in the node's image table")

// ErrNoEntrypoint is returned (wrapped) by Command when neither the image nor
// the container says what to run.
var ErrNoEntrypoint = errors.New("no command to run")

// Entry is one image of the table.
type Entry struct {
	// Image is the repository, e.g. "ambient-mesh/echo-server"; it is
	// normalised like the images pods name.
	Image string `json:"image"`
	// Entrypoint plays the image's ENTRYPOINT; a pod's command replaces it.
	Entrypoint []string `json:"entrypoint"`
	// Args plays the image's CMD: used only when the pod gives neither
	// command nor args.
	Args []string `json:"args,omitempty"`
}

// Table is a parsed image table, keyed by normalised repository.
type Table struct {
	byRepo map[string]Entry
}

type file struct {
	Images []Entry `json:"images"`
}

// Load reads and parses the image table at path.
func Load(path string) (*Table, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading image table: %w", err)
	}
	t, err := Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("parsing image table %s: %w", path, err)
	}
	return t, nil
}

// Parse parses an image table from YAML.
func Parse(raw []byte) (*Table, error) {
	var f file
	if err := yaml.Unmarshal(raw, &f); err != nil {
		return nil, err
	}
	t := &Table{byRepo: make(map[string]Entry, len(f.Images))}
	for i, e := range f.Images {
		if e.Image == "" {
			return nil, fmt.Errorf("entry %d: empty image", i)
		}
		repo := Repository(e.Image)
		if _, dup := t.byRepo[repo]; dup {
			return nil, fmt.Errorf("entry %d: image %s listed twice", i, repo)
		}
		t.byRepo[repo] = e
	}
	return t, nil
}

// Lookup returns the entry that plays image.
func (t *Table) Lookup(image string) (Entry, error) {
	if t != nil {
		if e, ok := t.byRepo[Repository(image)]; ok {
			return e, nil
		}
	}
	return Entry{}, fmt.Errorf("%s: %w", image, ErrUnknownImage)
}

// Len is the number of images in the table.
func (t *Table) Len() int {
	if t == nil {
		return 0
	}
	return len(t.byRepo)
}

// Repository normalises an image reference to the key the table is matched
// on: the digest (@sha256:...) and tag (:v1) are dropped, and so are the
// default registry (docker.io/, index.docker.io/) and its "library/"
// namespace, so "nginx", "docker.io/library/nginx:1.27" and
// "library/nginx@sha256:..." are all "nginx". Other registries are kept.
func Repository(image string) string {
	ref := strings.TrimSpace(image)
	if i := strings.IndexByte(ref, '@'); i >= 0 {
		ref = ref[:i]
	}
	// A colon after the last slash starts a tag; one before it belongs to a
	// registry host:port.
	if i := strings.LastIndexByte(ref, ':'); i >= 0 && i > strings.LastIndexByte(ref, '/') {
		ref = ref[:i]
	}
	for _, reg := range []string{"docker.io/", "index.docker.io/", "registry-1.docker.io/"} {
		ref = strings.TrimPrefix(ref, reg)
	}
	ref = strings.TrimPrefix(ref, "library/")
	return ref
}

// ImageID is a stable stand-in for the image digest a runtime reports in
// containerStatuses[].imageID: the repository with a digest of the program
// that plays it.
func ImageID(image string, argv0 string) string {
	sum := sha256.Sum256([]byte(Repository(image) + "\x00" + argv0))
	return Repository(image) + "@sha256:" + hex.EncodeToString(sum[:])
}

// Command returns the argv a container runs, following the Kubernetes rules
// for command and args against an image's ENTRYPOINT and CMD: a container
// command replaces the entrypoint and drops the image args; container args
// replace the image args. argv[0] is resolved with Resolve. expand, when not
// nil, applies $(VAR) expansion to the container's command and args (not to
// the image's, as in Kubernetes).
func (e Entry) Command(command, args []string, binDir string, expand func([]string) []string) ([]string, error) {
	if expand == nil {
		expand = func(s []string) []string { return s }
	}
	var argv []string
	switch {
	case len(command) > 0:
		argv = append(expand(command), expand(args)...)
	case len(args) > 0:
		argv = append(append([]string(nil), e.Entrypoint...), expand(args)...)
	default:
		argv = append(append([]string(nil), e.Entrypoint...), e.Args...)
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, fmt.Errorf("image %s: %w", e.Image, ErrNoEntrypoint)
	}
	p, err := Resolve(argv[0], binDir)
	if err != nil {
		return nil, err
	}
	argv[0] = p
	return argv, nil
}

// Resolve finds the program name refers to: a path (containing a slash) is
// taken as it is; a bare name is looked for in binDir first, then in $PATH.
func Resolve(name, binDir string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	if binDir != "" {
		p := filepath.Join(binDir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("resolving %s: %w", name, err)
	}
	return p, nil
}
