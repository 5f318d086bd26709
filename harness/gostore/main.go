// Command go-stargz-store runs the reference Go stargz-store (the store package of
// github.com/containerd/stargz-snapshotter, v0.12 as Debian packages it) on a mount point, so
// lazybench can measure it beside its own store.
//
// Usage: go-stargz-store [--config FILE] [--root DIR] [--log-level LEVEL] MOUNTPOINT
//
// Upstream's cmd/stargz-store is not packaged, and its registry setup
// (service/resolver) imports k8s.io/cri-api, which Debian does not package either. This
// main therefore builds the registry hosts itself from the same configuration keys:
//
//	[[resolver.host."ORIGIN".mirrors]]
//	host = "MIRROR"              // tried in order, the origin last
//	insecure = true              // plain HTTP (localhost is always plain HTTP)
//	request_timeout_sec = N      // 0: 30 s, < 0: no timeout
//
// Credentials come from the docker config file (DOCKER_CONFIG or ~/.docker/config.json), as
// upstream's v0.12 store took them: each host, origin or mirror, gets those stored for it.
// All other keys are those of fs/config.Config; keys this store does not know (lazybench's
// own, such as metrics_address) are ignored. SIGINT or SIGTERM unmounts and exits 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	iofs "io/fs"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/source"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/containerd/stargz-snapshotter/store"
	dockerconfig "github.com/docker/cli/cli/config"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
)

const defaultRequestTimeout = 30 * time.Second

type mirrorConfig struct {
	Host              string `toml:"host"`
	Insecure          bool   `toml:"insecure"`
	RequestTimeoutSec int    `toml:"request_timeout_sec"`
}

type hostConfig struct {
	Mirrors []mirrorConfig `toml:"mirrors"`
}

type resolverConfig struct {
	Host map[string]hostConfig `toml:"host"`
}

type storeConfig struct {
	config.Config
	Resolver resolverConfig `toml:"resolver"`
}

func main() {
	configPath := flag.String("config", "/etc/stargz-store/config.toml", "configuration file (TOML)")
	rootDir := flag.String("root", "/var/lib/stargz-store", "directory for the store's cache")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn, error")
	flag.Parse()
	if err := run(*configPath, *rootDir, *logLevel, flag.Args()); err != nil {
		fmt.Fprintf(os.Stderr, "go-stargz-store: %v\n", err)
		os.Exit(1)
	}
}

func run(configPath, rootDir, logLevel string, args []string) error {
	if len(args) != 1 {
		return errors.New("exactly one argument expected: the mount point")
	}
	mountpoint := args[0]
	level, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	logrus.SetLevel(level)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg storeConfig
	tree, err := toml.LoadFile(configPath)
	if err != nil {
		return fmt.Errorf("config %s: %w", configPath, err)
	}
	if err := tree.Unmarshal(&cfg); err != nil {
		return fmt.Errorf("config %s: %w", configPath, err)
	}
	if cfg.DisableVerification {
		return fmt.Errorf("config %s: content verification cannot be disabled", configPath)
	}
	if err := os.MkdirAll(rootDir, 0o700); err != nil {
		return err
	}
	// As upstream: an existing path is left to the mount to judge (a dead FUSE mount there
	// fails the mount, not this check).
	if err := os.MkdirAll(mountpoint, 0o755); err != nil && !errors.Is(err, iofs.ErrExist) {
		return err
	}

	hosts := registryHosts(cfg.Resolver, dockerCredentials(ctx))
	manager, err := store.NewLayerManager(ctx, rootDir, hosts, memorymetadata.NewReader, cfg.Config)
	if err != nil {
		return fmt.Errorf("layer manager: %w", err)
	}
	if err := store.Mount(ctx, mountpoint, manager, cfg.Debug); err != nil {
		return fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	log.G(ctx).WithField("mountpoint", mountpoint).Info("mounted")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	log.G(ctx).Infof("got %v; unmounting", <-sig)
	return unmount(ctx, mountpoint)
}

// unmount detaches the mount point; if a container still holds it, the mount is detached
// lazily (it disappears when the last user goes) so the process can still exit.
func unmount(ctx context.Context, mountpoint string) error {
	err := syscall.Unmount(mountpoint, 0)
	if errors.Is(err, syscall.EBUSY) {
		log.G(ctx).Warn("mount point busy; detaching it lazily")
		err = syscall.Unmount(mountpoint, syscall.MNT_DETACH)
	}
	if err != nil {
		return fmt.Errorf("unmount %s: %w", mountpoint, err)
	}
	log.G(ctx).Info("unmounted")
	return nil
}

type credentials func(host string) (string, string, error)

// dockerCredentials reads the docker config file on every lookup, so credentials added
// after the store started are used.
func dockerCredentials(ctx context.Context) credentials {
	return func(host string) (string, string, error) {
		cf, err := dockerconfig.Load("")
		if err != nil {
			log.G(ctx).WithError(err).Warn("cannot load the docker config file")
			return "", "", nil
		}
		if host == "docker.io" || host == "registry-1.docker.io" {
			host = "https://index.docker.io/v1/"
		}
		ac, err := cf.GetAuthConfig(host)
		if err != nil {
			return "", "", err
		}
		if ac.IdentityToken != "" {
			return "", ac.IdentityToken, nil
		}
		return ac.Username, ac.Password, nil
	}
}

// registryHosts lists, for a reference, its origin's mirrors in configured order and then
// the origin itself, each with its scheme, timeout and authorizer.
func registryHosts(cfg resolverConfig, creds credentials) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		origin := ref.Hostname()
		candidates := append(append([]mirrorConfig{}, cfg.Host[origin].Mirrors...),
			mirrorConfig{Host: origin})
		var hosts []docker.RegistryHost
		for _, m := range candidates {
			retrying := rhttp.NewClient()
			retrying.Logger = nil
			client := retrying.StandardClient()
			switch {
			case m.RequestTimeoutSec == 0:
				client.Timeout = defaultRequestTimeout
			case m.RequestTimeoutSec > 0:
				client.Timeout = time.Duration(m.RequestTimeoutSec) * time.Second
			}
			h := docker.RegistryHost{
				Client:       client,
				Host:         m.Host,
				Scheme:       "https",
				Path:         "/v2",
				Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
				Authorizer: docker.NewDockerAuthorizer(
					docker.WithAuthClient(client),
					docker.WithAuthCreds(creds)),
			}
			if local, _ := docker.MatchLocalhost(h.Host); local || m.Insecure {
				h.Scheme = "http"
			}
			if h.Host == "docker.io" {
				h.Host = "registry-1.docker.io"
			}
			hosts = append(hosts, h)
		}
		return hosts, nil
	}
}
