// Package bench holds knit's side-by-side benchmarks: each one runs knit and
// the anchor it must beat (DESIGN.md, "Targets") in the same process tree, on
// the same machine at the same time, and prints both with their ratio, so
// that a loaded machine slows both sides alike.
//
// Everything runs inside the lab's private network sandbox (package
// lab/sandbox; TestMain re-executes the test binary under unshare), so
// nothing here touches the machine's real network or sends traffic out.
// Binaries are built once into <repo>/.cache/bin (lab.BuildKnit,
// lab.BuildReferencePlugins) and copied into the benchmark's work dir, so a
// rebuild by someone else mid-run cannot swap them.
//
// The package has no code of its own besides this comment: the benchmarks
// are the _test.go files, one per area (cni_test.go, ...). Run them all with
// hack/bench.sh; results and the exact commands are in docs/benchmarks.md.
package bench
