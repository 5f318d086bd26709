// gowrite converts a layer tar to eStargz with the Go reference writer (containerd/
// stargz-snapshotter estargz, Debian's golang-github-containerd-stargz-snapshotter-dev)
// and prints {"toc_digest", "diff_id", "digest", "size", "annotations", "missed"} as JSON.
// The tests compare our writer and our store with it (tests/gotools.py builds it in GOPATH
// mode).
//
// usage: gowrite [-chunk N] [-level N] [-zstd] [-allow-missing] [-writer build|append|lossless]
//
//	IN.tar OUT.blob [PRIORITIZED ...]
//
// -writer build (the default) is estargz.Build: landmarks, prioritized files first, the
// layer cut into GOMAXPROCS parts written in parallel. append and lossless are the older
// streaming estargz.Writer (AppendTar, AppendTarLossLess: the input's tar header bytes
// kept as they are): no landmarks and no prioritized files, what `stargzify` wrote.
// "annotations" are the layer descriptor's (the TOC digest, the uncompressed size, and with
// -zstd the zstd:chunked manifest checksum and position); "missed" the prioritized files
// -allow-missing let the writer skip.
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
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "gowrite: "+format+"\n", a...)
	os.Exit(1)
}

type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// zstdCompression is the estargz.Compression Build takes: the zstd:chunked compressor and
// decompressor together.
type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

func main() {
	chunk := flag.Int("chunk", 0, "chunk size in bytes (0: the library's default)")
	level := flag.Int("level", -1, "gzip level 0..9 (-1: the library's default, 9)")
	useZstd := flag.Bool("zstd", false, "zstd frames and the zstd:chunked footer")
	allowMissing := flag.Bool("allow-missing", false, "skip prioritized files the tar lacks")
	writer := flag.String("writer", "build", "build, append or lossless")
	flag.Parse()
	if flag.NArg() < 2 {
		fail("usage: gowrite [flags] IN.tar OUT.blob [PRIORITIZED ...]")
	}
	in, err := os.Open(flag.Arg(0))
	if err != nil {
		fail("%v", err)
	}
	st, err := in.Stat()
	if err != nil {
		fail("%v", err)
	}
	metadata := map[string]string{}
	var compressor estargz.Compressor
	if *useZstd {
		compressor = &zstdchunked.Compressor{CompressionLevel: zstd.SpeedDefault, Metadata: metadata}
	} else if *level >= 0 {
		compressor = estargz.NewGzipCompressorWithLevel(*level)
	} else {
		compressor = estargz.NewGzipCompressor()
	}
	out, err := os.Create(flag.Arg(1))
	if err != nil {
		fail("%v", err)
	}
	h := sha256.New()
	c := &counter{}
	sink := io.MultiWriter(out, h, c)
	var tocDigest, diffID digest.Digest
	var missed []string
	switch *writer {
	case "build":
		opts := []estargz.Option{}
		if *useZstd {
			opts = append(opts, estargz.WithCompression(zstdCompression{
				compressor.(*zstdchunked.Compressor), new(zstdchunked.Decompressor)}))
		} else if *level >= 0 {
			opts = append(opts, estargz.WithCompressionLevel(*level))
		}
		if *chunk > 0 {
			opts = append(opts, estargz.WithChunkSize(*chunk))
		}
		if flag.NArg() > 2 {
			opts = append(opts, estargz.WithPrioritizedFiles(flag.Args()[2:]))
		}
		if *allowMissing {
			opts = append(opts, estargz.WithAllowPrioritizeNotFound(&missed))
		}
		blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
		if err != nil {
			fail("build: %v", err)
		}
		if _, err := io.Copy(sink, blob); err != nil {
			fail("write: %v", err)
		}
		if err := blob.Close(); err != nil { // DiffID is valid only after Close
			fail("%v", err)
		}
		tocDigest, diffID = blob.TOCDigest(), blob.DiffID()
	case "append", "lossless":
		if flag.NArg() > 2 || *allowMissing {
			fail("-writer %s takes no prioritized files", *writer)
		}
		w := estargz.NewWriterWithCompressor(sink, compressor)
		w.ChunkSize = *chunk
		if *writer == "append" {
			err = w.AppendTar(in)
		} else {
			err = w.AppendTarLossLess(in)
		}
		if err != nil {
			fail("append: %v", err)
		}
		if tocDigest, err = w.Close(); err != nil {
			fail("close: %v", err)
		}
		diffID = digest.Digest(w.DiffID())
	default:
		fail("-writer %q: want build, append or lossless", *writer)
	}
	if err := out.Close(); err != nil {
		fail("%v", err)
	}
	annotations := map[string]string{
		estargz.TOCJSONDigestAnnotation: tocDigest.String(),
	}
	for k, v := range metadata {
		annotations[k] = v
	}
	res := map[string]interface{}{
		"toc_digest":  tocDigest.String(),
		"diff_id":     diffID.String(),
		"digest":      "sha256:" + hex.EncodeToString(h.Sum(nil)),
		"size":        c.n,
		"annotations": annotations,
		"missed":      missed,
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fail("%v", err)
	}
}
