//go:build !linux

package agent

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"

	"github.com/ambient-mesh/ambient/cni-plugin/internal/redirect"
)

var errNotLinux = fmt.Errorf("%w on %s", redirect.ErrUnsupported, runtime.GOOS)

type kernelProbeSNAT struct{}

func (kernelProbeSNAT) Install([]netip.Prefix) error  { return errNotLinux }
func (kernelProbeSNAT) AddTarget(netip.Addr) error    { return errNotLinux }
func (kernelProbeSNAT) RemoveTarget(netip.Addr) error { return errNotLinux }
func (kernelProbeSNAT) Describe() (any, error)        { return nil, errNotLinux }

func redirectionInstalled(report any) bool {
	if r, ok := report.(interface{ Installed() bool }); ok {
		return r.Installed()
	}
	return report != nil
}

type procScanner struct{}

func newProcScanner(string, string) *procScanner { return &procScanner{} }

func (*procScanner) Find([]netip.Addr) (*os.File, error) { return nil, errNotLinux }
