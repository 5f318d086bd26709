// gowrite converts a layer tar to eStargz with the Go reference writer (containerd/
// stargz-snapshotter estargz.Build, Debian's golang-github-containerd-stargz-snapshotter-dev)
// and prints {"toc_digest", "diff_id", "digest", "size"} as JSON. The
// tests compare our writer with it (tests/gotools.py builds it in GOPATH mode).
//
// usage: gowrite [-chunk N] IN.tar OUT.blob [PRIORITIZED ...]
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/containerd/stargz-snapshotter/estargz"
)

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "gowrite: "+format+"\n", a...)
	os.Exit(1)
}

type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func main() {
	chunk := flag.Int("chunk", 0, "chunk size in bytes (0: the library's default)")
	flag.Parse()
	if flag.NArg() < 2 {
		fail("usage: gowrite [-chunk N] IN.tar OUT.blob [PRIORITIZED ...]")
	}
	in, err := os.Open(flag.Arg(0))
	if err != nil {
		fail("%v", err)
	}
	st, err := in.Stat()
	if err != nil {
		fail("%v", err)
	}
	opts := []estargz.Option{}
	if *chunk > 0 {
		opts = append(opts, estargz.WithChunkSize(*chunk))
	}
	if flag.NArg() > 2 {
		opts = append(opts, estargz.WithPrioritizedFiles(flag.Args()[2:]))
	}
	blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
	if err != nil {
		fail("build: %v", err)
	}
	out, err := os.Create(flag.Arg(1))
	if err != nil {
		fail("%v", err)
	}
	h := sha256.New()
	c := &counter{}
	if _, err := io.Copy(io.MultiWriter(out, h, c), blob); err != nil {
		fail("write: %v", err)
	}
	if err := out.Close(); err != nil {
		fail("%v", err)
	}
	if err := blob.Close(); err != nil { // DiffID is valid only after Close
		fail("%v", err)
	}
	res := map[string]interface{}{
		"toc_digest": blob.TOCDigest().String(),
		"diff_id":    blob.DiffID().String(),
		"digest":     "sha256:" + hex.EncodeToString(h.Sum(nil)),
		"size":       c.n,
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fail("%v", err)
	}
}
