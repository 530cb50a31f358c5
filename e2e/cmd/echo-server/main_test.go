package main

import "testing"

func TestRunRefusesBadSettings(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
	}{
		{name: "an unknown flag is refused", args: []string{"--no-such-flag"}},
		{name: "a malformed port in the environment is refused", env: map[string]string{"HTTP_PORTS": "eighty"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			if code := run(tt.args); code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
		})
	}
}
