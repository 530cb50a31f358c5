// Package cniconf chains ambient-cni into the node's CNI configuration: it
// finds the primary network configuration the container runtime uses,
// appends the ambient-cni plugin to its plugin list (keeping the primary
// plugin, any other chained plugins and every field it does not know),
// removes it again on uninstall, and re-inserts it when the primary CNI
// rewrites its file. It also installs the plugin binary into the CNI bin
// directory.
package cniconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
)

// PluginType is the "type" of our entry in a conflist, and the name of the
// plugin binary.
const PluginType = "ambient-cni"

// member is one key of a JSON object, in file order.
type member struct {
	key   string
	value json.RawMessage
}

// object is a JSON object that keeps its key order and its values' bytes,
// so rewriting a file changes nothing but what we mean to change.
type object []member

func parseObject(data []byte) (object, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	var obj object
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key := tok.(string) // object keys are always strings
		if seen[key] {
			return nil, fmt.Errorf("duplicate key %q", key)
		}
		seen[key] = true
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		obj = append(obj, member{key, v})
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON object")
	}
	return obj, nil
}

func (o object) get(key string) (json.RawMessage, bool) {
	for _, m := range o {
		if m.key == key {
			return m.value, true
		}
	}
	return nil, false
}

func (o object) getString(key string) string {
	v, ok := o.get(key)
	if !ok {
		return ""
	}
	var s string
	if json.Unmarshal(v, &s) != nil {
		return ""
	}
	return s
}

// set replaces key's value in place, or appends key.
func (o object) set(key string, v json.RawMessage) object {
	for i := range o {
		if o[i].key == key {
			o[i].value = v
			return o
		}
	}
	return append(o, member{key, v})
}

func (o object) marshal() json.RawMessage {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(m.key)
		b.Write(k)
		b.WriteByte(':')
		b.Write(m.value)
	}
	b.WriteByte('}')
	return b.Bytes()
}

// format renders a document the way we write files: two-space indent and
// a final newline.
func format(raw json.RawMessage) ([]byte, error) {
	var b bytes.Buffer
	if err := json.Indent(&b, raw, "", "  "); err != nil {
		return nil, err
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}

// Entry is our plugin's configuration in the conflist.
type Entry struct {
	AgentSocket string // "agentSocket"; empty leaves it out (the plugin's default)
	LogLevel    string // "log_level"; empty leaves it out
}

// kind tells what a configuration file holds.
type kind int

const (
	kindInvalid  kind = iota
	kindConflist      // {"name", "cniVersion", "plugins": [...]}
	kindConf          // a single plugin: {"name", "cniVersion", "type", ...}
)

// parseConfig reads a configuration file's object and says what it is. A
// file the runtime could not use either is an error.
func parseConfig(data []byte) (object, kind, error) {
	obj, err := parseObject(data)
	if err != nil {
		return nil, kindInvalid, err
	}
	if raw, ok := obj.get("plugins"); ok {
		plugins, err := parsePlugins(raw)
		if err != nil {
			return nil, kindInvalid, err
		}
		if len(plugins) == 0 {
			return nil, kindInvalid, errors.New("empty plugins list")
		}
		return obj, kindConflist, nil
	}
	if obj.getString("type") == "" {
		return nil, kindInvalid, errors.New("neither a plugins list nor a plugin type")
	}
	return obj, kindConf, nil
}

func parsePlugins(raw json.RawMessage) ([]object, error) {
	var list []json.RawMessage
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, fmt.Errorf("plugins is not a list: %w", err)
	}
	plugins := make([]object, 0, len(list))
	for i, p := range list {
		obj, err := parseObject(p)
		if err != nil {
			return nil, fmt.Errorf("plugins[%d]: %w", i, err)
		}
		if obj.getString("type") == "" {
			return nil, fmt.Errorf("plugins[%d] has no type", i)
		}
		plugins = append(plugins, obj)
	}
	return plugins, nil
}

func marshalPlugins(plugins []object) json.RawMessage {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, p := range plugins {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(p.marshal())
	}
	b.WriteByte(']')
	return b.Bytes()
}

// toConflist wraps a single plugin configuration in a list, as runtimes do
// (libcni's ConfListFromConf): the conf, whole, becomes the only plugin.
func toConflist(conf object) object {
	var list object
	for _, key := range []string{"cniVersion", "name"} {
		if v, ok := conf.get(key); ok {
			list = append(list, member{key, v})
		}
	}
	return append(list, member{"plugins", marshalPlugins([]object{conf})})
}

func isOurs(p object) bool { return p.getString("type") == PluginType }

// insert returns the conflist with our entry as the last plugin: an existing
// entry keeps any extra fields someone added but gets our settings, and
// duplicates are dropped. changed is false when the list already ends with
// exactly that entry and holds no other.
func insert(list object, e Entry) (out object, changed bool, err error) {
	raw, _ := list.get("plugins")
	plugins, err := parsePlugins(raw)
	if err != nil {
		return nil, false, err
	}
	entry := object{{"type", mustJSON(PluginType)}}
	var rest []object
	ours := 0
	for _, p := range plugins {
		if isOurs(p) {
			if ours == 0 {
				entry = p
			}
			ours++
			continue
		}
		rest = append(rest, p)
	}
	before := entry.marshal()
	entry = e.apply(slicesClone(entry))
	if ours == 1 && isOurs(plugins[len(plugins)-1]) && jsonEqual(before, entry.marshal()) {
		return list, false, nil
	}
	plugins = append(rest, entry)
	return slicesClone(list).set("plugins", marshalPlugins(plugins)), true, nil
}

// remove drops every entry of ours from the conflist.
func remove(list object) (out object, changed bool, err error) {
	raw, _ := list.get("plugins")
	plugins, err := parsePlugins(raw)
	if err != nil {
		return nil, false, err
	}
	var kept []object
	for _, p := range plugins {
		if !isOurs(p) {
			kept = append(kept, p)
		}
	}
	if len(kept) == len(plugins) {
		return list, false, nil
	}
	return slicesClone(list).set("plugins", marshalPlugins(kept)), true, nil
}

func (e Entry) apply(p object) object {
	p = p.set("type", mustJSON(PluginType))
	p = setOrDelete(p, "agentSocket", e.AgentSocket)
	return setOrDelete(p, "log_level", e.LogLevel)
}

func setOrDelete(o object, key, value string) object {
	if value != "" {
		return o.set(key, mustJSON(value))
	}
	out := o[:0]
	for _, m := range o {
		if m.key != key {
			out = append(out, m)
		}
	}
	return out
}

func slicesClone(o object) object { return append(object(nil), o...) }

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}
