package node

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"knit.dev/knit/cni/plugin"
)

// kernel is what the node setup changes in the node's network namespace.
// Tests replace it with a fake.
type kernel interface {
	// ensureBridge is plugin.EnsureBridge.
	ensureBridge(name string, mtu int, podCIDRs []netip.Prefix, owned func(netip.Prefix) bool) error
	// sysctl sets /proc/sys/<path> to value unless it has it already and
	// reports whether it changed it. A missing setting is an error that
	// wraps fs.ErrNotExist.
	sysctl(path, value string) (bool, error)
	// defaultRouteMTU is the MTU of the interface of the default route
	// (IPv4 first), 0 without a default route.
	defaultRouteMTU() (int, error)
	// deleteLink deletes a link by name; a missing link is not an error.
	deleteLink(name string) error
}

// netlinkKernel is the real kernel, in the namespace do runs its function
// in: the calling thread's (production: the agent is started in the node's
// namespace) or, in tests, a throwaway namespace entered on a locked
// thread (ns.NetNS.Do).
type netlinkKernel struct {
	do func(func() error) error
}

func (k netlinkKernel) run(f func() error) error {
	if k.do == nil {
		return f()
	}
	return k.do(f)
}

func (k netlinkKernel) ensureBridge(name string, mtu int, podCIDRs []netip.Prefix, owned func(netip.Prefix) bool) error {
	return k.run(func() error {
		_, err := plugin.EnsureBridge(name, mtu, podCIDRs, owned)
		return err
	})
}

func (k netlinkKernel) sysctl(path, value string) (changed bool, err error) {
	err = k.run(func() error {
		full := "/proc/sys/" + path
		b, err := os.ReadFile(full)
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(b)) == value {
			return nil
		}
		if err := os.WriteFile(full, []byte(value), 0o644); err != nil {
			return err
		}
		changed = true
		return nil
	})
	return changed, err
}

func (k netlinkKernel) defaultRouteMTU() (mtu int, err error) {
	err = k.run(func() error {
		for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			routes, err := netlinksafe.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return fmt.Errorf("list routes: %w", err)
			}
			for _, r := range routes {
				if r.Dst != nil {
					if ones, _ := r.Dst.Mask.Size(); ones != 0 {
						continue
					}
				}
				idx := r.LinkIndex
				if idx == 0 && len(r.MultiPath) > 0 {
					idx = r.MultiPath[0].LinkIndex
				}
				l, err := netlink.LinkByIndex(idx) // a GET, not a dump: cannot be interrupted
				if err != nil {
					return fmt.Errorf("default route interface: %w", err)
				}
				mtu = l.Attrs().MTU
				return nil
			}
		}
		return nil
	})
	return mtu, err
}

func (k netlinkKernel) deleteLink(name string) error {
	return k.run(func() error {
		l, err := netlinksafe.LinkByName(name)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("look up %s: %w", name, err)
		}
		if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("delete %s: %w", name, err)
		}
		return nil
	})
}
