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
