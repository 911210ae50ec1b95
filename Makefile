# Conveniences; the README's two commands are hack/demo.sh and hack/test.sh.
.PHONY: build demo test bench
build:
	go build -o .cache/bin/knit .
demo:
	./hack/demo.sh
test:
	./hack/test.sh
bench:
	./hack/bench.sh

# knit's container image, built without a Docker daemon (hack/image, a Go
# module of its own using go-containerregistry): a static knit binary for
# linux/amd64 and linux/arm64 plus the nft and iptables userland from Debian packages.
# Writes .cache/image/knit-oci.tar (every platform; OCI layout:
# `ctr -n k8s.io images import --all-platforms`, `skopeo copy oci-archive:`)
# and .cache/image/knit-linux-<arch>.tar (one platform: `docker load`,
# `ctr images import`). Tagged $(IMAGE), the manifest's default image; pass
# IMAGE=registry/knit:tag and render with `knit manifest --image` to match.
IMAGE ?= knit.dev/knit:latest
PLATFORMS ?= linux/amd64,linux/arm64
.PHONY: image manifest
image:
	cd hack/image && go run . -repo ../.. -out ../../.cache/image -tag $(IMAGE) -platforms $(PLATFORMS)

# Re-render deploy/knit.yaml after changing package manifest.
manifest:
	go run . manifest > deploy/knit.yaml.tmp && mv deploy/knit.yaml.tmp deploy/knit.yaml
