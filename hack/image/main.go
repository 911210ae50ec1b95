// Command image builds knit's container image without a Docker daemon, with
// github.com/google/go-containerregistry: for each platform (linux/amd64,
// linux/arm64 by default) a static knit binary and the netfilter userland the
// agent needs (knftables runs nft), as an OCI image; then one multi-platform
// OCI archive and one single-platform archive per platform.
//
//	go build (GOOS=linux GOARCH=<arch> CGO_ENABLED=0)  -> layer 2: /usr/local/bin/knit
//	    and ./cni/cmd/knit-cni                             and /usr/local/bin/knit-cni
//	Debian bookworm .debs for <arch> (apt-get download
//	with a private state dir, dpkg-deb --fsys-tarfile) -> layer 1: /usr/sbin/nft + libraries
//	config: entrypoint /usr/local/bin/knit, PATH, platform, labels
//	    -> .cache/image/knit-oci.tar            all platforms, OCI image layout in a tar
//	                                            (ctr -n k8s.io images import --all-platforms,
//	                                             skopeo copy oci-archive:..., crane push)
//	    -> .cache/image/knit-linux-<arch>.tar  one platform (docker load, ctr images import)
//
// The .debs come from the machine's Debian sources through apt-get, with
// package lists kept under the output directory (.cache/image/apt/<arch>),
// so the host's dpkg architectures and apt state are never touched. Layers
// carry fixed timestamps (SOURCE_DATE_EPOCH, default the time of the
// repository's HEAD commit), so two builds of the same tree give the same
// image digests.
//
// When run as root on a host of one of the platforms, the image built for
// it is checked by extracting its file system and running `knit version`
// and `nft --version` in a chroot (no network is touched): that catches a
// missing shared library.
//
// It is a module of its own (like lab/controlplane) so that knit's go.mod
// does not carry an image library it never links. Run it with `make image`.
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// binaryPath is where the image holds knit; the manifest (package
// knit.dev/knit/manifest, BinaryPath) runs it from there.
const binaryPath = "usr/local/bin/knit"

// pluginPath is the plugin-only build beside knit: `knit install-cni` and
// the agent install it as the CNI plugin when it is there (it starts about
// 10 ms faster per exec than the multi-call binary).
const pluginPath = "usr/local/bin/knit-cni"

// nftPackages are the Debian packages of the netfilter userland the agent
// runs: nft (knftables execs it; the proxy's and overlay's default) and
// iptables-legacy/iptables-nft with their -save/-restore (the proxy's
// iptables backend, for kernels without nftables), plus the libraries
// `ldd` lists for them, libc6 included.
var nftPackages = []string{
	"nftables", "libnftables1", "libnftnl11", "libmnl0", "libjansson4", "libgmp10",
	"libxtables12", "libedit2", "libtinfo6", "libbsd0", "libmd0", "libc6",
	"iptables", "libip4tc2", "libip6tc2", "libnetfilter-conntrack3", "libnfnetlink0",
}

// dropPrefixes are paths of the .debs that a container never reads.
var dropPrefixes = []string{"usr/share/doc/", "usr/share/man/", "usr/share/locale/", "usr/share/lintian/", "usr/share/info/", "usr/share/bug/"}

type options struct {
	repo, out, tag, version string
	platforms               []string
	nft, verify             bool
	epoch                   time.Time
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("image: ")
	var o options
	var platforms string
	flag.StringVar(&o.repo, "repo", "../..", "knit repository root")
	flag.StringVar(&o.out, "out", "../../.cache/image", "output directory")
	flag.StringVar(&o.tag, "tag", "knit.dev/knit:latest", "image reference written into the archives (the manifest's default image)")
	flag.StringVar(&o.version, "version", "", "knit version (-X knit.dev/knit/command.Version); default: git describe")
	flag.StringVar(&platforms, "platforms", "linux/amd64,linux/arm64", "comma-separated platforms")
	flag.BoolVar(&o.nft, "nft", true, "include the nft userland from Debian packages (the agent needs it)")
	flag.BoolVar(&o.verify, "verify", true, "run knit and nft from the host platform's image in a chroot (root only)")
	flag.Parse()
	o.platforms = strings.Split(platforms, ",")
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		s = gitCommitTime(o.repo)
	}
	sec, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		log.Fatalf("SOURCE_DATE_EPOCH: %v", err)
	}
	o.epoch = time.Unix(sec, 0).UTC()
	if err := run(o); err != nil {
		log.Fatal(err)
	}
}

func run(o options) error {
	var err error
	if o.repo, err = filepath.Abs(o.repo); err != nil {
		return err
	}
	if o.out, err = filepath.Abs(o.out); err != nil {
		return err
	}
	if o.version == "" {
		o.version = gitVersion(o.repo)
	}
	ref, err := name.NewTag(o.tag)
	if err != nil {
		return fmt.Errorf("-tag: %w", err)
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range o.platforms {
		plat, err := v1.ParsePlatform(p)
		if err != nil || plat.OS != "linux" {
			return fmt.Errorf("platform %q: want linux/<arch>", p)
		}
		if plat.Architecture == "arm64" && plat.Variant == "" {
			plat.Variant = "v8"
		}
		img, err := buildImage(o, plat)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		single := filepath.Join(o.out, "knit-linux-"+plat.Architecture+".tar")
		if err := tarball.WriteToFile(single, ref, img); err != nil {
			return fmt.Errorf("%s: write %s: %w", p, single, err)
		}
		d, _ := img.Digest()
		log.Printf("%s: %s (%s)", p, single, d)
		if o.verify && plat.Architecture == runtime.GOARCH && os.Geteuid() == 0 {
			if err := verify(img, o.out, plat.Architecture); err != nil {
				return fmt.Errorf("%s: verify: %w", p, err)
			}
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: plat}})
	}
	archive := filepath.Join(o.out, "knit-oci.tar")
	if err := writeOCIArchive(archive, idx, ref, o.epoch); err != nil {
		return err
	}
	d, _ := idx.Digest()
	log.Printf("all platforms: %s (index %s, %s)", archive, d, ref)
	return nil
}

// buildImage builds knit for plat and assembles its image.
func buildImage(o options, plat *v1.Platform) (v1.Image, error) {
	bin := filepath.Join(o.out, "knit-linux-"+plat.Architecture)
	plugin := filepath.Join(o.out, "knit-cni-linux-"+plat.Architecture)
	for _, b := range []struct{ out, pkg string }{{bin, "."}, {plugin, "./cni/cmd/knit-cni"}} {
		cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false",
			"-ldflags", "-s -w -X knit.dev/knit/command.Version="+o.version, "-o", b.out, b.pkg)
		cmd.Dir = o.repo
		cmd.Env = append(os.Environ(), "GOOS=linux", "GOARCH="+plat.Architecture, "CGO_ENABLED=0")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("go build %s: %w", b.pkg, err)
		}
	}
	var layers []v1.Layer
	if o.nft {
		l, err := debLayer(o.out, plat.Architecture)
		if err != nil {
			return nil, fmt.Errorf("nft layer: %w", err)
		}
		layers = append(layers, l)
	}
	bl, err := binaryLayer(map[string]string{binaryPath: bin, pluginPath: plugin}, o.epoch)
	if err != nil {
		return nil, err
	}
	layers = append(layers, bl)

	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	if img, err = mutate.AppendLayers(img, layers...); err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = plat.OS, plat.Architecture, plat.Variant
	cf.Created = v1.Time{Time: o.epoch}
	cf.Config.Entrypoint = []string{"/" + binaryPath}
	cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":       "knit",
		"org.opencontainers.image.description": "the whole networking layer of a Kubernetes cluster in one binary",
		"org.opencontainers.image.version":     o.version,
	}
	return mutate.ConfigFile(img, cf)
}

// binaryLayer is a layer holding each file of files (image path -> local
// file), mode 0755, owned by root, with every timestamp at epoch.
func binaryLayer(files map[string]string, epoch time.Time) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, dir := range []string{"usr/", "usr/local/", "usr/local/bin/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names) // same tar, same digest
	for _, name := range names {
		data, err := os.ReadFile(files[name])
		if err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o755, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return layerFromBytes(buf.Bytes())
}

func layerFromBytes(b []byte) (v1.Layer, error) {
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

// debLayer downloads nftPackages for arch and merges their file systems
// into one layer.
func debLayer(out, arch string) (v1.Layer, error) {
	debs, err := fetchDebs(filepath.Join(out, "apt", arch), arch)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	seen := map[string]bool{}
	for _, deb := range debs {
		cmd := exec.Command("dpkg-deb", "--fsys-tarfile", deb)
		var data, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &data, &stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("dpkg-deb --fsys-tarfile %s: %w: %s", deb, err, stderr.Bytes())
		}
		if err := copyDebFiles(tw, tar.NewReader(&data), seen); err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Base(deb), err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return layerFromBytes(buf.Bytes())
}

// copyDebFiles copies a package's file system into tw: paths made relative,
// documentation dropped, each directory written once, owner root.
func copyDebFiles(tw *tar.Writer, tr *tar.Reader, seen map[string]bool) error {
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		n := strings.TrimPrefix(strings.TrimPrefix(h.Name, "./"), "/")
		if n == "" || dropped(n) {
			continue
		}
		if h.Typeflag == tar.TypeDir && !strings.HasSuffix(n, "/") {
			n += "/"
		}
		if seen[n] {
			continue
		}
		seen[n] = true
		h.Name = n
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "root", "root"
		if h.Typeflag == tar.TypeLink {
			h.Linkname = strings.TrimPrefix(strings.TrimPrefix(h.Linkname, "./"), "/")
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return err
		}
	}
}

func dropped(n string) bool {
	for _, p := range dropPrefixes {
		if strings.HasPrefix(n, p) || n+"/" == p {
			return true
		}
	}
	return false
}

// fetchDebs runs apt-get download for arch with apt state of its own under
// dir (lists, cache, an empty dpkg status), so that the host's dpkg
// architectures and package lists stay as they are. It returns the .deb
// paths in nftPackages order.
func fetchDebs(dir, arch string) ([]string, error) {
	debs := filepath.Join(dir, "debs")
	for _, d := range []string{filepath.Join(dir, "lists", "partial"), filepath.Join(dir, "cache", "archives", "partial"), debs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	status := filepath.Join(dir, "status")
	if err := os.WriteFile(status, nil, 0o644); err != nil {
		return nil, err
	}
	aptOpts := []string{"-qq",
		"-o", "Dir::State::Lists=" + filepath.Join(dir, "lists"),
		"-o", "Dir::State::status=" + status,
		"-o", "Dir::Cache=" + filepath.Join(dir, "cache"),
		"-o", "APT::Architecture=" + arch,
		"-o", "APT::Architectures=" + arch,
		"-o", "APT::Sandbox::User=root", // download into a root-owned cache dir
	}
	find := func() ([]string, bool) {
		var paths []string
		for _, p := range nftPackages {
			m, _ := filepath.Glob(filepath.Join(debs, p+"_*_"+arch+".deb"))
			if len(m) == 0 {
				return nil, false
			}
			sort.Strings(m)
			paths = append(paths, m[len(m)-1])
		}
		return paths, true
	}
	if paths, ok := find(); ok {
		return paths, nil // cached: no network
	}
	apt := func(args ...string) error {
		cmd := exec.Command("apt-get", append(append([]string{}, aptOpts...), args...)...)
		cmd.Dir = debs
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		return cmd.Run()
	}
	log.Printf("downloading %d Debian packages for %s", len(nftPackages), arch)
	if err := apt("update"); err != nil {
		return nil, fmt.Errorf("apt-get update (%s): %w", arch, err)
	}
	if err := apt(append([]string{"download"}, nftPackages...)...); err != nil {
		return nil, fmt.Errorf("apt-get download (%s): %w", arch, err)
	}
	paths, ok := find()
	if !ok {
		return nil, fmt.Errorf("apt-get download left packages missing in %s", debs)
	}
	return paths, nil
}

// verify unpacks img and runs its knit and nft in a chroot.
func verify(img v1.Image, out, arch string) error {
	root := filepath.Join(out, "rootfs-"+arch)
	if err := os.RemoveAll(root); err != nil {
		return err
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(root)
	rc := mutate.Extract(img)
	defer rc.Close()
	if err := untar(tar.NewReader(rc), root); err != nil {
		return err
	}
	for _, args := range [][]string{{"/" + binaryPath, "version"}, {"/" + pluginPath}, {"/usr/sbin/nft", "--version"},
		{"/usr/sbin/iptables-legacy-restore", "--version"}, {"/usr/sbin/iptables-nft-restore", "--version"}} {
		cmd := exec.Command("chroot", append([]string{root}, args...)...)
		if args[0] == "/"+pluginPath {
			cmd.Env = append(os.Environ(), "CNI_COMMAND=VERSION") // the plugin's supported versions, as JSON
		}
		outb, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("chroot %s: %w: %s", strings.Join(args, " "), err, outb)
		}
		log.Printf("verified in a chroot: %s -> %s", strings.Join(args, " "), strings.TrimSpace(string(outb)))
	}
	return nil
}

func untar(tr *tar.Reader, root string) error {
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(root, filepath.Clean("/"+h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, fs.FileMode(h.Mode)&fs.ModePerm)
		case tar.TypeReg:
			if err = os.MkdirAll(filepath.Dir(p), 0o755); err == nil {
				var f *os.File
				if f, err = os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, fs.FileMode(h.Mode)&fs.ModePerm); err == nil {
					_, err = io.Copy(f, tr)
					err = errors.Join(err, f.Close())
				}
			}
		case tar.TypeSymlink:
			if err = os.MkdirAll(filepath.Dir(p), 0o755); err == nil {
				err = os.Symlink(h.Linkname, p)
			}
		case tar.TypeLink:
			err = os.Link(filepath.Join(root, filepath.Clean("/"+h.Linkname)), p)
		}
		if err != nil {
			return fmt.Errorf("unpack %s: %w", h.Name, err)
		}
	}
}

// writeOCIArchive writes idx as an OCI image layout and tars it into path,
// with the reference in the annotations containerd and the OCI spec read.
func writeOCIArchive(path string, idx v1.ImageIndex, ref name.Tag, epoch time.Time) error {
	dir, err := os.MkdirTemp(filepath.Dir(path), ".oci-layout-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": ref.TagStr(),
		"io.containerd.image.name":          ref.Name(),
	})); err != nil {
		return err
	}
	return tarDir(dir, path, epoch)
}

// tarDir writes the files under dir into a tar at path, sorted, with fixed
// owners and times, through a temporary file.
func tarDir(dir, path string, epoch time.Time) error {
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && p != dir {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		return err
	}
	sort.Strings(files)
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	for _, p := range files {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		h := &tar.Header{Name: filepath.ToSlash(rel), Mode: 0o644, ModTime: epoch, Format: tar.FormatPAX}
		if fi.IsDir() {
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
		} else {
			h.Typeflag, h.Size = tar.TypeReg, fi.Size()
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if !fi.IsDir() {
			in, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, in)
			in.Close()
			if err != nil {
				return err
			}
		}
	}
	if err := errors.Join(tw.Close(), f.Close()); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

// gitVersion is `git describe --always --dirty` of repo, or "dev".
func gitVersion(repo string) string {
	out, err := exec.Command("git", "-C", repo, "describe", "--always", "--dirty").Output()
	if err != nil {
		return "dev"
	}
	return strings.TrimSpace(string(out))
}

// gitCommitTime is the Unix time of repo's HEAD commit, or "0".
func gitCommitTime(repo string) string {
	out, err := exec.Command("git", "-C", repo, "log", "-1", "--format=%ct").Output()
	if err != nil || len(bytes.TrimSpace(out)) == 0 {
		return "0"
	}
	return string(bytes.TrimSpace(out))
}
