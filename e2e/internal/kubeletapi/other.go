//go:build !linux

package kubeletapi

import (
	"context"
	"errors"
	"io"
	"time"

	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
)

// errLinuxOnly is returned by exec and port-forward off Linux, where there are
// no namespaces to enter.
var errLinuxOnly = errors.New("kubeletapi: exec and port-forward need Linux")

func (containerExecutor) ExecInContainer(context.Context, string, string, string, []string, io.Reader, io.WriteCloser, io.WriteCloser, bool, <-chan remotecommand.TerminalSize, time.Duration) error {
	return errLinuxOnly
}

type netnsForwarder struct{ netns string }

func (netnsForwarder) PortForward(context.Context, string, string, int32, io.ReadWriteCloser) error {
	return errLinuxOnly
}
