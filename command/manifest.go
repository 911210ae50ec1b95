package command

import (
	"github.com/urfave/cli/v2"

	"knit.dev/knit/manifest"
)

// manifestCommand prints the install manifest. With no flags it prints
// exactly deploy/knit.yaml (a test keeps the two equal).
func manifestCommand() *cli.Command {
	return &cli.Command{
		Name:  "manifest",
		Usage: "print the install manifest (kubectl apply -f -); defaults give deploy/knit.yaml",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "cluster-cidr", Value: manifest.DefaultClusterCIDR, Usage: "pod network CIDR(s), comma-separated (kube-controller-manager --cluster-cidr)"},
			&cli.StringFlag{Name: "service-cidr", Value: manifest.DefaultServiceCIDR, Usage: "Service CIDR(s), comma-separated (API server --service-cluster-ip-range)"},
			&cli.StringFlag{Name: "cluster-dns", Value: manifest.DefaultClusterDNS, Usage: "cluster DNS Service IP(s), comma-separated (kubelet --cluster-dns)"},
			&cli.StringFlag{Name: "cluster-domain", Value: manifest.DefaultClusterDomain},
			&cli.StringFlag{Name: "image", Value: manifest.DefaultImage, Usage: "knit image (make image builds one)"},
			&cli.StringFlag{Name: "namespace", Value: manifest.DefaultNamespace, Usage: "namespace of the DaemonSet, its ServiceAccount and ConfigMap"},
			&cli.StringFlag{Name: "apiserver", Usage: "host:port of the API server, for clusters without kube-proxy (the agent must not depend on the Service IP it programs)"},
		},
		Action: func(c *cli.Context) error {
			cfg := manifest.Config{
				Namespace:     c.String("namespace"),
				Image:         c.String("image"),
				ClusterDomain: c.String("cluster-domain"),
				APIServer:     c.String("apiserver"),
			}
			var err error
			if cfg.ClusterCIDRs, err = parsePrefixes("cluster-cidr", c.String("cluster-cidr")); err != nil {
				return err
			}
			if cfg.ServiceCIDRs, err = parsePrefixes("service-cidr", c.String("service-cidr")); err != nil {
				return err
			}
			if cfg.ClusterDNS, err = parseAddrs("cluster-dns", c.String("cluster-dns")); err != nil {
				return err
			}
			out, err := manifest.Render(cfg)
			if err != nil {
				return err
			}
			_, err = c.App.Writer.Write(out)
			return err
		},
	}
}
