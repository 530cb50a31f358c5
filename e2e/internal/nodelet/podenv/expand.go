package podenv

import (
	"strings"
	"unicode/utf8"
)

// Expand expands $(VAR) references in each of s against env ("K=V"
// strings, later ones winning), as the kubelet does for command and args:
// $$ yields a literal $, and a reference to an unknown variable or an
// unterminated "$(" is left as written.
func Expand(s []string, env []string) []string {
	if s == nil {
		return nil
	}
	vars := make(map[string]string, len(env))
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	mapping := func(name string) (string, bool) {
		v, ok := vars[name]
		return v, ok
	}
	out := make([]string, len(s))
	for i, in := range s {
		out[i] = expand(in, mapping)
	}
	return out
}

// expand is third_party/forked/golang/expansion.Expand from Kubernetes.
func expand(input string, mapping func(string) (string, bool)) string {
	var b strings.Builder
	checkpoint := 0
	for cursor := 0; cursor < len(input); cursor++ {
		if input[cursor] != '$' || cursor+1 >= len(input) {
			continue
		}
		b.WriteString(input[checkpoint:cursor])
		read, isVar, advance := readVariableName(input[cursor+1:])
		if isVar {
			if v, ok := mapping(read); ok {
				b.WriteString(v)
			} else {
				b.WriteString("$(" + read + ")")
			}
		} else {
			b.WriteString(read)
		}
		cursor += advance
		checkpoint = cursor + 1
	}
	return b.String() + input[checkpoint:]
}

// readVariableName reads what follows a '$': the content read, whether it
// names a variable, and how many bytes it consumed.
func readVariableName(input string) (string, bool, int) {
	r, size := utf8.DecodeRuneInString(input)
	switch r {
	case '$':
		return input[:size], false, size
	case '(':
		for i := 1; i < len(input); i++ {
			if input[i] == ')' {
				return input[1:i], true, i + 1
			}
		}
		return "$(", false, 1
	default:
		return "$" + string(r), false, size
	}
}
