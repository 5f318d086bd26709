// gocheck opens a layer blob with the Go reference reader (containerd/stargz-snapshotter
// estargz, Debian's golang-github-containerd-stargz-snapshotter-dev), verifies the TOC digest
// and every chunk the way the snapshotter does, and prints the tree as JSON lines in the
// format of the reference vectors' NAME.entries.jsonl. Used by tests/estargz/test_go_reader.py.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	digest "github.com/opencontainers/go-digest"
)

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "gocheck: "+format+"\n", a...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: gocheck BLOB TOC_DIGEST")
	}
	f, err := os.Open(os.Args[1])
	if err != nil {
		fail("%v", err)
	}
	st, err := f.Stat()
	if err != nil {
		fail("%v", err)
	}
	sr := io.NewSectionReader(f, 0, st.Size())
	r, err := estargz.Open(sr, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		fail("open: %v", err)
	}
	v, err := r.VerifyTOC(digest.Digest(os.Args[2]))
	if err != nil {
		fail("verify TOC: %v", err)
	}
	var lines []map[string]interface{}
	var walk func(path string, e *estargz.TOCEntry)
	walk = func(path string, e *estargz.TOCEntry) {
		line := map[string]interface{}{
			"name": path, "type": e.Type, "size": e.Size, "mode": e.Mode,
			"uid": e.UID, "gid": e.GID, "xattrs": len(e.Xattrs),
		}
		if e.Name != path { // a hardlink: the tree holds its target's entry
			line["type"] = "hardlink"
			line["linkName"] = e.Name
		} else {
			if e.LinkName != "" {
				line["linkName"] = e.LinkName
			}
			if e.Type == "reg" {
				line["sha256"] = readVerified(r, v, e)
			}
		}
		lines = append(lines, line)
		if e.Type == "dir" {
			e.ForeachChild(func(base string, c *estargz.TOCEntry) bool {
				p := base
				if path != "" {
					p = path + "/" + base
				}
				walk(p, c)
				return true
			})
		}
	}
	root, ok := r.Lookup("")
	if !ok {
		fail("no root")
	}
	walk("", root)
	sort.Slice(lines, func(i, j int) bool {
		return lines[i]["name"].(string) < lines[j]["name"].(string)
	})
	enc := json.NewEncoder(os.Stdout)
	for _, l := range lines {
		if err := enc.Encode(l); err != nil {
			fail("%v", err)
		}
	}
}

// readVerified reads a regular file chunk by chunk, checking each against its chunkDigest
// (what the snapshotter does before serving), and returns the hex sha256 of the whole file.
func readVerified(r *estargz.Reader, v estargz.TOCEntryVerifier, e *estargz.TOCEntry) string {
	fr, err := r.OpenFile(e.Name)
	if err != nil {
		fail("open %q: %v", e.Name, err)
	}
	whole := sha256.New()
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(e.Name, off)
		if !ok {
			fail("%q: no chunk at offset %d", e.Name, off)
		}
		if ce.ChunkOffset != off {
			fail("%q: chunk at %d starts at %d", e.Name, off, ce.ChunkOffset)
		}
		cv, err := v.Verifier(ce)
		if err != nil {
			fail("%q: %v", e.Name, err)
		}
		buf := make([]byte, ce.ChunkSize)
		if _, err := fr.ReadAt(buf, ce.ChunkOffset); err != nil && err != io.EOF {
			fail("%q: read at %d: %v", e.Name, ce.ChunkOffset, err)
		}
		cv.Write(buf)
		if !cv.Verified() {
			fail("%q: chunk at %d does not match its chunkDigest", e.Name, ce.ChunkOffset)
		}
		whole.Write(buf)
		off += ce.ChunkSize
	}
	return hex.EncodeToString(whole.Sum(nil))
}
