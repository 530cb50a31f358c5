package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// ErrAlreadyUp is returned by Up when the state dir holds a running cluster.
var ErrAlreadyUp = errors.New("a cluster is already up in this dir; run down first")

// Up brings the control plane and the nodes up and returns once every node is
// Ready and the default ServiceAccount exists. On failure it tears down what it
// made.
func Up(ctx context.Context, cfg Config) (err error) {
	if cfg.Nodes <= 0 {
		cfg.Nodes = 2
	}
	if cfg.Nodes > 200 {
		return fmt.Errorf("%d nodes do not fit the underlay /24", cfg.Nodes)
	}
	if err := cfg.absolutePaths(); err != nil {
		return err
	}
	if len(clusterProcesses(cfg.Dir)) > 0 {
		return ErrAlreadyUp
	}
	if err := cfg.checkBinaries(); err != nil {
		return err
	}
	// Leftovers of an interrupted run would make half the steps fail.
	if err := Down(cfg); err != nil {
		return fmt.Errorf("cleaning leftovers: %w", err)
	}
	defer func() {
		if err != nil {
			cfg.logf("up failed, tearing down: %v", err)
			cfg.logTails(40)
			if derr := Down(cfg); derr != nil {
				err = errors.Join(err, derr)
			}
		}
	}()
	start := time.Now()
	for _, d := range []string{"pki", "logs", "etcd", "nodes"} {
		if err := os.MkdirAll(cfg.path(d), 0o700); err != nil {
			return err
		}
	}
	nodes := cfg.nodes()
	if err := cfg.writePKI(nodes); err != nil {
		return fmt.Errorf("writing certificates: %w", err)
	}
	if err := cfg.mountBPFFS(); err != nil {
		return err
	}
	if err := setupUnderlay(); err != nil {
		return err
	}
	for _, n := range nodes {
		if err := setupNodeNetwork(n, nodes); err != nil {
			return err
		}
		if err := routePodCIDR(n); err != nil {
			return err
		}
		if err := cfg.prepareNodeRoot(n); err != nil {
			return err
		}
	}
	if err := cfg.startControlPlane(); err != nil {
		return err
	}
	client, err := cfg.adminClient()
	if err != nil {
		return err
	}
	if err := waitAPIServer(ctx, client, cfg.apiserverPID); err != nil {
		return fmt.Errorf("waiting for kube-apiserver (see %s): %w", cfg.path("logs", "kube-apiserver.log"), err)
	}
	cfg.logf("kube-apiserver ready after %s", time.Since(start).Round(time.Millisecond))
	if err := bootstrapRBAC(ctx, client); err != nil {
		return err
	}
	if err := cfg.startControllers(); err != nil {
		return err
	}
	for _, n := range nodes {
		if err := cfg.startNode(n); err != nil {
			return err
		}
	}
	if err := waitNodesReady(ctx, client, nodes); err != nil {
		return err
	}
	if err := waitDefaultServiceAccount(ctx, client); err != nil {
		return err
	}
	cfg.logf("cluster up after %s", time.Since(start).Round(time.Millisecond))
	return nil
}

// absolutePaths makes every path absolute: processes start in the state dir.
func (c *Config) absolutePaths() error {
	for _, p := range []*string{&c.Dir, &c.KubeBin, &c.CNIBin, &c.BinDir, &c.ImageTable, &c.Etcd} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		*p = abs
	}
	return nil
}

func (c *Config) checkBinaries() error {
	var errs []error
	need := []string{c.Etcd,
		filepath.Join(c.KubeBin, "kube-apiserver"), filepath.Join(c.KubeBin, "kube-controller-manager"),
		filepath.Join(c.KubeBin, "kube-scheduler"), filepath.Join(c.KubeBin, "kube-proxy"),
		filepath.Join(c.CNIBin, "bridge"), filepath.Join(c.CNIBin, "host-local"), filepath.Join(c.CNIBin, "portmap"),
		filepath.Join(c.BinDir, "nodelet"), c.ImageTable}
	for _, p := range need {
		if _, err := os.Stat(p); err != nil {
			errs = append(errs, fmt.Errorf("missing %s (run make build-deps build): %w", p, err))
		}
	}
	return errors.Join(errs...)
}

func (c *Config) writePKI(nodes []Node) error {
	dir := c.path("pki")
	ca, err := newAuthority("ambient-mesh local cluster CA")
	if err != nil {
		return err
	}
	if err := ca.write(dir, "ca"); err != nil {
		return err
	}
	apiIP := net.IP(APIServerAddr().AsSlice())
	leaves := map[string]certSpec{
		"kube-apiserver": {CommonName: "kube-apiserver", Server: true,
			DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc." + clusterDomain},
			IPs:      []net.IP{apiIP, net.IP(KubernetesServiceIP().AsSlice()), net.IPv4(127, 0, 0, 1)}},
		"apiserver-kubelet-client": {CommonName: "kube-apiserver-kubelet-client", Client: true},
		"admin":                    {CommonName: "kubernetes-admin", Organization: []string{"system:masters"}, Client: true},
		"kube-controller-manager":  {CommonName: "system:kube-controller-manager", Client: true},
		"kube-scheduler":           {CommonName: "system:kube-scheduler", Client: true},
		"kube-proxy":               {CommonName: "system:kube-proxy", Client: true},
	}
	for _, n := range nodes {
		leaves["node-"+n.Name] = certSpec{CommonName: "system:node:" + n.Name, Organization: []string{"system:nodes"}, Client: true}
		leaves["kubelet-"+n.Name] = certSpec{CommonName: n.Name, DNSNames: []string{n.Name}, IPs: []net.IP{net.IP(n.IP.AsSlice())}, Server: true}
	}
	for name, spec := range leaves {
		if err := ca.issue(dir, name, spec); err != nil {
			return err
		}
	}
	// The service-account signing key pair; the apiserver verifies with the
	// public half and signs bound tokens with the private one.
	if err := writeKeyPair(dir, "sa"); err != nil {
		return err
	}
	kubeconfigs := map[string]string{
		"admin":                   c.KubeconfigPath(),
		"kube-controller-manager": c.path("pki", "kube-controller-manager.kubeconfig"),
		"kube-scheduler":          c.path("pki", "kube-scheduler.kubeconfig"),
		"kube-proxy":              c.path("pki", "kube-proxy.kubeconfig"),
	}
	for _, n := range nodes {
		kubeconfigs["node-"+n.Name] = c.path("pki", "node-"+n.Name+".kubeconfig")
	}
	for cred, path := range kubeconfigs {
		if err := c.writeKubeconfig(path, cred); err != nil {
			return err
		}
	}
	return nil
}

// writeKubeconfig writes a kubeconfig for the client certificate <cred>.crt.
func (c *Config) writeKubeconfig(path, cred string) error {
	server := "https://" + net.JoinHostPort(APIServerAddr().String(), strconv.Itoa(apiserverPort))
	kc := clientcmdapi.NewConfig()
	kc.Clusters["local"] = &clientcmdapi.Cluster{Server: server, CertificateAuthority: c.path("pki", "ca.crt")}
	kc.AuthInfos[cred] = &clientcmdapi.AuthInfo{ClientCertificate: c.path("pki", cred+".crt"), ClientKey: c.path("pki", cred+".key")}
	kc.Contexts["local"] = &clientcmdapi.Context{Cluster: "local", AuthInfo: cred}
	kc.CurrentContext = "local"
	return clientcmd.WriteToFile(*kc, path)
}

func (c *Config) adminClient() (kubernetes.Interface, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", c.KubeconfigPath())
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(rc)
}

// prepareNodeRoot lays out the node's filesystem: the CNI plugins and the
// primary network's conflist, as a node image and its CNI installer would.
func (c *Config) prepareNodeRoot(n Node) error {
	binDir := filepath.Join(n.Root, "opt", "cni", "bin")
	confDir := filepath.Join(n.Root, "etc", "cni", "net.d")
	for _, d := range []string{binDir, confDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	for _, plugin := range []string{"bridge", "host-local", "loopback", "portmap"} {
		if err := copyFile(filepath.Join(c.CNIBin, plugin), filepath.Join(binDir, plugin), 0o755); err != nil {
			return fmt.Errorf("installing CNI plugin %s on %s: %w", plugin, n.Name, err)
		}
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "ambk",
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": "cni0", "isGateway": true, "hairpinMode": true,
				"ipam": map[string]any{
					"type":   "host-local",
					"ranges": [][]map[string]string{{{"subnet": n.PodCIDR.String()}}},
					"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
					// Keep IPAM state in the node root, not the shared host /var/lib/cni.
					"dataDir": filepath.Join(n.Root, "var", "lib", "cni", "networks"),
				},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	}
	raw, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(confDir, "10-ambk.conflist"), raw, 0o644)
}

func (c *Config) startControlPlane() error {
	pki := func(f string) string { return c.path("pki", f) }
	etcd := proc{role: "etcd", argv: []string{c.Etcd,
		"--name=ambk", "--data-dir=" + c.path("etcd"),
		"--listen-client-urls=http://127.0.0.1:" + strconv.Itoa(etcdClientPort),
		"--advertise-client-urls=http://127.0.0.1:" + strconv.Itoa(etcdClientPort),
		"--listen-peer-urls=http://127.0.0.1:" + strconv.Itoa(etcdPeerPort),
		"--initial-advertise-peer-urls=http://127.0.0.1:" + strconv.Itoa(etcdPeerPort),
		"--initial-cluster=ambk=http://127.0.0.1:" + strconv.Itoa(etcdPeerPort),
		"--listen-metrics-urls=", "--log-level=warn",
		// etcd 3.4 lacks on-demand progress requests, so the apiserver's watch
		// cache learns the current revision only from these notifications;
		// without them a quiet cluster answers fresh watches and lists with
		// "Too large resource version" after a 3 s wait.
		"--experimental-watch-progress-notify-interval=100ms",
	}}
	api := APIServerAddr().String()
	apiserver := proc{role: "kube-apiserver", argv: []string{filepath.Join(c.KubeBin, "kube-apiserver"),
		"--bind-address=" + api, "--advertise-address=" + api, "--secure-port=" + strconv.Itoa(apiserverPort),
		"--etcd-servers=http://127.0.0.1:" + strconv.Itoa(etcdClientPort),
		"--service-cluster-ip-range=" + serviceCIDR.String(),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--client-ca-file=" + pki("ca.crt"),
		"--tls-cert-file=" + pki("kube-apiserver.crt"), "--tls-private-key-file=" + pki("kube-apiserver.key"),
		"--kubelet-client-certificate=" + pki("apiserver-kubelet-client.crt"),
		"--kubelet-client-key=" + pki("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority=" + pki("ca.crt"),
		"--kubelet-preferred-address-types=InternalIP",
		"--service-account-issuer=https://kubernetes.default.svc." + clusterDomain,
		"--service-account-key-file=" + pki("sa.pub"),
		"--service-account-signing-key-file=" + pki("sa.key"),
		"--profiling=false",
	}}
	if _, err := c.start(etcd); err != nil {
		return err
	}
	pid, err := c.start(apiserver)
	c.apiserverPID = pid
	return err
}

func (c *Config) startControllers() error {
	pki := func(f string) string { return c.path("pki", f) }
	cm := proc{role: "kube-controller-manager", argv: []string{filepath.Join(c.KubeBin, "kube-controller-manager"),
		"--kubeconfig=" + pki("kube-controller-manager.kubeconfig"),
		"--authentication-kubeconfig=" + pki("kube-controller-manager.kubeconfig"),
		"--authorization-kubeconfig=" + pki("kube-controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1", "--leader-elect=false",
		"--use-service-account-credentials=true",
		"--service-account-private-key-file=" + pki("sa.key"),
		"--root-ca-file=" + pki("ca.crt"),
		"--cluster-signing-cert-file=" + pki("ca.crt"), "--cluster-signing-key-file=" + pki("ca.key"),
		"--service-cluster-ip-range=" + serviceCIDR.String(),
		"--cluster-cidr=" + clusterCIDR.String(), "--allocate-node-cidrs=false",
		"--profiling=false",
	}}
	sched := proc{role: "kube-scheduler", argv: []string{filepath.Join(c.KubeBin, "kube-scheduler"),
		"--kubeconfig=" + pki("kube-scheduler.kubeconfig"),
		"--authentication-kubeconfig=" + pki("kube-scheduler.kubeconfig"),
		"--authorization-kubeconfig=" + pki("kube-scheduler.kubeconfig"),
		"--bind-address=127.0.0.1", "--leader-elect=false", "--profiling=false",
	}}
	for _, p := range []proc{cm, sched} {
		if _, err := c.start(p); err != nil {
			return err
		}
	}
	return nil
}

func (c *Config) startNode(n Node) error {
	pki := func(f string) string { return c.path("pki", f) }
	ip := n.IP.String()
	proxy := proc{role: "kube-proxy-" + n.Name, netns: n.NetNS, argv: []string{filepath.Join(c.KubeBin, "kube-proxy"),
		"--kubeconfig=" + pki("kube-proxy.kubeconfig"),
		"--hostname-override=" + n.Name,
		"--proxy-mode=nftables",
		"--cluster-cidr=" + clusterCIDR.String(),
		"--masquerade-all",
		"--conntrack-max-per-core=0",
		"--bind-address=" + ip,
		"--metrics-bind-address=" + ip + ":10249",
		"--healthz-bind-address=" + ip + ":10256",
	}}
	nodelet := proc{role: "nodelet-" + n.Name, netns: n.NetNS, argv: []string{filepath.Join(c.BinDir, "nodelet"),
		"--node-name=" + n.Name, "--node-ip=" + ip, "--pod-cidr=" + n.PodCIDR.String(),
		"--kubeconfig=" + pki("node-"+n.Name+".kubeconfig"),
		"--root=" + n.Root,
		"--image-table=" + c.ImageTable, "--bin-dir=" + c.BinDir,
		"--tls-cert-file=" + pki("kubelet-"+n.Name+".crt"), "--tls-private-key-file=" + pki("kubelet-"+n.Name+".key"),
		"--client-ca-file=" + pki("ca.crt"),
		"--port=" + strconv.Itoa(kubeletPort),
		"--kubernetes-service-host=" + KubernetesServiceIP().String(), "--kubernetes-service-port=443",
	}}
	for _, p := range []proc{nodelet, proxy} {
		if _, err := c.start(p); err != nil {
			return err
		}
	}
	return nil
}

// bootstrapRBAC lets the apiserver's kubelet client use the kubelet API, as
// kubeadm does.
func bootstrapRBAC(ctx context.Context, client kubernetes.Interface) error {
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "kube-apiserver-kubelet-client"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:kubelet-api-admin"},
		Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "User", Name: "kube-apiserver-kubelet-client"}},
	}
	_, err := client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("binding the apiserver's kubelet client: %w", err)
	}
	return nil
}

func waitAPIServer(ctx context.Context, client kubernetes.Interface, pid int) error {
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		if waitGone([]int{pid}, 0) {
			return false, errors.New("kube-apiserver exited")
		}
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err == nil && string(body) == "ok", nil
	})
}

func waitNodesReady(ctx context.Context, client kubernetes.Interface, nodes []Node) error {
	var notReady []string
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		notReady = notReady[:0]
		for _, n := range nodes {
			node, err := client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil || !nodeReady(node) {
				notReady = append(notReady, n.Name)
			}
		}
		return len(notReady) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("nodes not Ready: %s: %w", strings.Join(notReady, ", "), err)
	}
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func waitDefaultServiceAccount(ctx context.Context, client kubernetes.Interface) error {
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		_, err = client.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
		return err == nil, nil
	})
}

// Down stops every process of the cluster, removes its namespaces, links and
// mounts, and deletes the state dir. It is safe on a cluster that is half up
// or already gone.
func Down(cfg Config) error {
	if err := cfg.absolutePaths(); err != nil {
		return err
	}
	var errs []error
	procs := clusterProcesses(cfg.Dir)
	// Nodelets first, so they stop their pods and run CNI DEL; etcd last, since
	// an apiserver whose etcd is gone takes minutes to shut down.
	stages := [][]int{nil, nil, nil}
	for pid, role := range procs {
		switch {
		case strings.HasPrefix(role, "nodelet-"):
			stages[0] = append(stages[0], pid)
		case role == "etcd":
			stages[2] = append(stages[2], pid)
		default:
			stages[1] = append(stages[1], pid)
		}
	}
	for i, pids := range stages {
		grace := 10 * time.Second
		if i == 0 {
			grace = 20 * time.Second
		}
		if err := stopAll(pids, grace); err != nil {
			errs = append(errs, err)
		}
	}
	// Whatever still runs inside a node or pod namespace (containers whose
	// nodelet died first) goes too.
	inodes := map[uint64]bool{}
	for _, p := range ourNetNSFiles(cfg.Dir) {
		var st syscall.Stat_t
		if syscall.Stat(p, &st) == nil {
			inodes[st.Ino] = true
		}
	}
	if stray := processesInNetNS(inodes); len(stray) > 0 {
		cfg.logf("stopping %d processes left in cluster namespaces", len(stray))
		if err := stopAll(stray, 2*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if err := unmountUnder(cfg.Dir); err != nil {
		errs = append(errs, err)
	}
	if err := teardownNetwork(); err != nil {
		errs = append(errs, err)
	}
	if err := removeCreatedMountpoints(cfg.Dir); err != nil {
		errs = append(errs, err)
	}
	if err := cfg.unmountBPFFS(); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(cfg.Dir); err != nil {
		errs = append(errs, fmt.Errorf("removing %s: %w", cfg.Dir, err))
	}
	// The default dir's parent is ours too; leave anyone else's parent alone.
	if parent := filepath.Dir(cfg.Dir); filepath.Base(parent) == "ambient-mesh" {
		os.Remove(parent)
	}
	return errors.Join(errs...)
}

// Leftovers lists what of a cluster in cfg.Dir still exists: processes,
// network namespaces, links, mounts and the state dir. After Down it is empty.
func Leftovers(cfg Config) []string {
	if err := cfg.absolutePaths(); err != nil {
		return []string{err.Error()}
	}
	var left []string
	for pid, role := range clusterProcesses(cfg.Dir) {
		if !isZombie(pid) {
			left = append(left, fmt.Sprintf("process %d (%s)", pid, role))
		}
	}
	for _, f := range ourNetNSFiles(cfg.Dir) {
		left = append(left, "netns "+f)
	}
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if strings.HasPrefix(l.Attrs().Name, namePrefix) {
				left = append(left, "link "+l.Attrs().Name)
			}
		}
	}
	if _, err := netlink.RouteGet(net.IP(KubernetesServiceIP().AsSlice())); err != nil {
		left = append(left, "route unreachable "+serviceCIDR.String())
	}
	if raw, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(raw), "\n") {
			if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(unescapeMountPath(f[4]), cfg.Dir+"/") {
				left = append(left, "mount "+f[4])
			}
		}
	}
	if _, err := os.Stat(cfg.Dir); err == nil {
		left = append(left, "dir "+cfg.Dir)
	}
	if _, err := os.Stat(bpfPinDir); err == nil {
		left = append(left, "bpf pins "+bpfPinDir)
	}
	sort.Strings(left)
	return left
}

// ourNetNSFiles lists the node namespaces and the pod namespaces nodelets
// bind-mounted under the state dir.
func ourNetNSFiles(dir string) []string {
	var files []string
	entries, _ := os.ReadDir(netnsDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), namePrefix+"-") {
			files = append(files, filepath.Join(netnsDir, e.Name()))
		}
	}
	nodes, _ := filepath.Glob(filepath.Join(dir, "nodes", "*", "var", "run", "netns", "*"))
	return append(files, nodes...)
}

// unmountUnder detaches every mount point below dir, deepest first.
func unmountUnder(dir string) error {
	if dir == "" || dir == "/" {
		return fmt.Errorf("refusing to unmount under %q", dir)
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	var targets []string
	prefix := filepath.Clean(dir) + "/"
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], prefix) {
			targets = append(targets, unescapeMountPath(fields[4]))
		}
	}
	sort.Slice(targets, func(i, j int) bool { return len(targets[i]) > len(targets[j]) })
	var errs []error
	for _, t := range targets {
		if err := syscall.Unmount(t, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", t, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeCreatedMountpoints removes the empty files and dirs nodelets had to
// create on the host as bind-mount targets, deepest first.
func removeCreatedMountpoints(dir string) error {
	lists, _ := filepath.Glob(filepath.Join(dir, "nodes", "*", "created-mountpoints"))
	seen := map[string]bool{}
	var paths []string
	for _, l := range lists {
		raw, err := os.ReadFile(l)
		if err != nil {
			continue
		}
		for _, p := range strings.Split(string(raw), "\n") {
			if p = strings.TrimSpace(p); filepath.IsAbs(p) && !seen[p] {
				seen[p] = true
				paths = append(paths, p)
			}
		}
	}
	sort.Slice(paths, func(i, j int) bool { return len(paths[i]) > len(paths[j]) })
	for _, p := range paths {
		if fi, err := os.Lstat(p); err == nil && fi.Mode().IsRegular() && fi.Size() > 0 {
			continue // something wrote real content there; leave it
		}
		os.Remove(p) // fails, harmlessly, on a dir that is not empty
	}
	return nil
}

// bpffsPath is where nodes keep pinned eBPF objects; bpfPinDir is the mesh's
// part of it (redirection programs and socket maps per pod).
const (
	bpffsPath = "/sys/fs/bpf"
	bpfPinDir = bpffsPath + "/ambient"
)

// mountBPFFS mounts bpffs where a node image would have it, remembering in
// the state dir that we did, so Down unmounts only what Up mounted.
func (c *Config) mountBPFFS() error {
	var st syscall.Statfs_t
	if err := syscall.Statfs(bpffsPath, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := syscall.Mount("bpf", bpffsPath, "bpf", 0, ""); err != nil {
		return fmt.Errorf("mounting bpffs at %s: %w", bpffsPath, err)
	}
	return os.WriteFile(c.path("bpffs-mounted"), nil, 0o644)
}

func (c *Config) unmountBPFFS() error {
	var errs []error
	if err := os.RemoveAll(bpfPinDir); err != nil {
		errs = append(errs, fmt.Errorf("removing pins under %s: %w", bpfPinDir, err))
	}
	if _, err := os.Stat(c.path("bpffs-mounted")); err == nil {
		if err := syscall.Unmount(bpffsPath, 0); err != nil {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", bpffsPath, err))
		}
	}
	return errors.Join(errs...)
}

// logTails reports the last lines of every component log, since Down is about
// to delete them.
func (c *Config) logTails(n int) {
	logs, _ := filepath.Glob(c.path("logs", "*.log"))
	for _, l := range logs {
		raw, err := os.ReadFile(l)
		if err != nil || len(raw) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		c.logf("--- last lines of %s:\n%s", filepath.Base(l), strings.Join(lines, "\n"))
	}
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}
