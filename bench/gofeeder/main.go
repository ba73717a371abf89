// Command gofeeder is the Hubble benchmark's grpc-go server: it frames GetFlows like Hubble Relay.
//
// Hubble Relay and the Cilium agent's Hubble server are grpc-go servers: every message goes out in
// its own HTTP/2 DATA frame, and grpc-go batches the frames into large socket writes. This server
// is grpc-go too, with a codec that passes pre-encoded bytes (no generated code). What it sends is
// decided by a selector on a unix socket (bench/grpc_feeder.py, the replay relay's own selection and
// field mask): for every call it writes
//
//	u32 len, method path; u32 len, request bytes
//
// and reads back the response messages as "u32 len, bytes", ended by u32 0xFFFFFFFF, u32 gRPC status
// code, u32 len, status message. A selector that holds the stream open (follow) just stops writing;
// when the client cancels, the selector connection is closed. Each message is sent as soon as the
// selector has written it (a paced selector paces the stream).
//
// The feeder exits when its standard input closes (the benchmark that started it went away).
//
// Build (Debian 12): GOPATH=/usr/share/gocode GO111MODULE=off go build -o build/gofeeder bench/gofeeder/main.go
// with the golang-go and golang-google-grpc-dev packages.
package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
)

const endMarker = 0xFFFFFFFF

// rawCodec replaces the proto codec: requests are received and responses sent as the bytes given.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.([]byte)
	if !ok {
		return nil, fmt.Errorf("gofeeder: cannot send %T", v)
	}
	return b, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("gofeeder: cannot receive into %T", v)
	}
	*p = append((*p)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

type feeder struct {
	selector string
}

func writeChunk(w io.Writer, b []byte) error {
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(b)))
	if _, err := w.Write(n[:]); err != nil {
		return err
	}
	_, err := w.Write(b)
	return err
}

func readU32(r io.Reader) (uint32, error) {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(n[:]), nil
}

// handle serves any method: the request goes to the selector, its answer back to the client.
func (f *feeder) handle(_ interface{}, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	var req []byte
	if err := stream.RecvMsg(&req); err != nil {
		return err
	}
	sel, err := net.Dial("unix", f.selector)
	if err != nil {
		return status.Error(codes.Unavailable, err.Error())
	}
	defer sel.Close()
	done := make(chan struct{})
	defer close(done)
	go func() { // a cancelled call ends the selector's stream too
		select {
		case <-stream.Context().Done():
			sel.Close()
		case <-done:
		}
	}()
	w := bufio.NewWriter(sel)
	if writeChunk(w, []byte(method)) != nil || writeChunk(w, req) != nil || w.Flush() != nil {
		return status.Error(codes.Unavailable, "selector went away")
	}
	r := bufio.NewReaderSize(sel, 64*1024)
	for {
		n, err := readU32(r)
		if err != nil {
			return stream.Context().Err() // cancelled: nothing to report; else the selector died
		}
		if n == endMarker {
			code, err1 := readU32(r)
			size, err2 := readU32(r)
			msg := make([]byte, size)
			if _, err3 := io.ReadFull(r, msg); err1 != nil || err2 != nil || err3 != nil {
				return status.Error(codes.Unavailable, "selector went away")
			}
			if code == 0 {
				return nil
			}
			return status.Error(codes.Code(code), string(msg))
		}
		msg := make([]byte, n)
		if _, err := io.ReadFull(r, msg); err != nil {
			return status.Error(codes.Unavailable, "selector went away")
		}
		if err := stream.SendMsg(msg); err != nil {
			return err
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "host:port to serve gRPC on (plaintext)")
	selector := flag.String("selector", "", "unix socket of the selector that decides what to send")
	flag.Parse()
	if *selector == "" {
		fmt.Fprintln(os.Stderr, "gofeeder: -selector is required")
		os.Exit(2)
	}
	encoding.RegisterCodec(rawCodec{})
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gofeeder:", err)
		os.Exit(1)
	}
	go func() { // the parent's end of stdin closes when it exits: so does the feeder
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	f := &feeder{selector: *selector}
	server := grpc.NewServer(grpc.UnknownServiceHandler(f.handle))
	fmt.Printf("listening %s\n", lis.Addr())
	os.Stdout.Sync()
	if err := server.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		fmt.Fprintln(os.Stderr, "gofeeder:", err)
		os.Exit(1)
	}
}
