//go:build e2e

package cni

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestThePluginStaysChainedWhenThePrimaryCNIRewritesItsConfig(t *testing.T) {
	env := kubetest.Get(t)
	conflist := filepath.Join(env.Config.Dir, "nodes", "node1", "etc", "cni", "net.d", "10-ambk.conflist")
	chained := func() (bool, error) {
		raw, err := os.ReadFile(conflist)
		if err != nil {
			return false, err
		}
		var conf struct {
			Plugins []map[string]any `json:"plugins"`
		}
		if err := json.Unmarshal(raw, &conf); err != nil {
			return false, nil // mid-rewrite
		}
		types := []string{}
		for _, p := range conf.Plugins {
			types = append(types, p["type"].(string))
		}
		// The primary plugins first, ours last.
		return strings.Join(types, ",") == "bridge,portmap,ambient-cni", nil
	}
	if ok, err := chained(); err != nil || !ok {
		t.Fatalf("node1's conflist does not chain ambient-cni last (%v)", err)
	}
	// The primary CNI's installer writes its own version back, as a
	// DaemonSet-installed CNI does on restart.
	raw, _ := os.ReadFile(conflist)
	var conf map[string]any
	json.Unmarshal(raw, &conf)
	plugins := conf["plugins"].([]any)
	conf["plugins"] = plugins[:len(plugins)-1]
	rewritten, _ := json.MarshalIndent(conf, "", "  ")
	if err := os.WriteFile(conflist, rewritten, 0o644); err != nil {
		t.Fatal(err)
	}
	env.WaitFor(t, 30*time.Second, "ambient-cni chained again", func(context.Context) (bool, error) {
		ok, err := chained()
		return ok, err
	})
}
