package anchors

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestUpToDate(t *testing.T) {
	old := time.Now().Add(-time.Hour)
	tests := []struct {
		name  string
		noBin bool
		touch string // file made newer than the binary
		want  bool
	}{
		{name: "no binary", noBin: true, want: false},
		{name: "binary newer than every source", want: true},
		{name: "go file changed", touch: "main.go", want: false},
		{name: "go.sum changed", touch: "go.sum", want: false},
		{name: "go file in a subdirectory changed", touch: "sub/x.go", want: false},
		{name: "other files do not count", touch: "README.md", want: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "src")
			for _, f := range []string{"main.go", "go.mod", "go.sum", "README.md", "sub/x.go"} {
				p := filepath.Join(src, f)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, nil, 0o644); err != nil {
					t.Fatal(err)
				}
				if err := os.Chtimes(p, old, old); err != nil {
					t.Fatal(err)
				}
			}
			bin := filepath.Join(dir, "bin")
			if !tt.noBin {
				if err := os.WriteFile(bin, nil, 0o755); err != nil {
					t.Fatal(err)
				}
				binTime := old.Add(time.Minute)
				if err := os.Chtimes(bin, binTime, binTime); err != nil {
					t.Fatal(err)
				}
			}
			if tt.touch != "" {
				now := time.Now()
				if err := os.Chtimes(filepath.Join(src, tt.touch), now, now); err != nil {
					t.Fatal(err)
				}
			}
			got, err := upToDate(bin, src)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("upToDate = %v, want %v", got, tt.want)
			}
		})
	}
}
