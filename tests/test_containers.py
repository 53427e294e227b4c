"""Jobs in containers, without running one: the command line for each kind of device, the
mounts and the environment inside, the submit fields, the runtimes a node gossips, and a
coordinator that never places an image where no runtime is."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from flexmesh.agent.apijson import BadRequest, parse_submit
from flexmesh.agent.config import ConfigError, load
from flexmesh.agent.containers import (
    ContainerError,
    ContainerRun,
    build,
    container_name,
    env_file_text,
    image_problem,
)
from flexmesh.agent.devices.base import Device
from flexmesh.agent.runtime import containers as runtime_containers
from flexmesh.agent.runtime.containers import Containers, cdi_gpu_names
from flexmesh.agent.scheduler import Proposal, Scheduler
from flexmesh.policies import DEFAULT_POLICY, Candidate, get_policy, get_spec
from flexmesh.protocol import facts, wire

UUID = "GPU-0f3c1a2b-1234-5678-9abc-def012345678"
UUID2 = "GPU-aaaaaaaa-1234-5678-9abc-def012345678"


def gpu(uuid: str = UUID) -> Device:
    return Device(uuid, "gpu", "NVIDIA H100", 81559, "nvml",
                  visible_env={"CUDA_VISIBLE_DEVICES": uuid})


def npu(n: int) -> Device:
    return Device(f"npu{n}", "npu", "Ascend 910B", 65536, "ascend",
                  visible_env={"ASCEND_RT_VISIBLE_DEVICES": str(n)})


def run(**kw: object) -> ContainerRun:
    base = ContainerRun(
        runtime="podman", image="localhost/app:1", command=["python", "train.py", "--lr=1"],
        job_id="0123456789ab", lease_id="lease-42", node="gpu1", user=(65534, 65534),
        devices=[], env={"FLEXMESH_JOB_ID": "0123456789ab"}, env_file="/s/jobs/x/container.env")
    return replace(base, **kw)  # type: ignore[arg-type]


def after(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_the_job_runs_confined_as_its_user_with_no_network_and_labels_naming_it() -> None:
    cmd = build(run(extra_args=["--ulimit", "nofile=1024:1024"]))
    argv = cmd.argv
    assert argv[:3] == ["podman", "run", "--rm"]
    assert argv[-4:] == ["localhost/app:1", "python", "train.py", "--lr=1"]
    assert after(argv, "--user") == ["65534:65534"]
    assert after(argv, "--cap-drop") == ["all"]
    assert after(argv, "--security-opt") == ["no-new-privileges"]
    assert after(argv, "--network") == ["none"]
    assert "--init" in argv  # a stop reaches the command, not a PID 1 that ignores it
    assert after(argv, "--label") == ["flexmesh.job=0123456789ab", "flexmesh.lease=lease-42",
                                      "flexmesh.node=gpu1"]
    assert after(argv, "--name") == [cmd.name] == [container_name("0123456789ab", "lease-42")]
    assert after(argv, "--env-file") == ["/s/jobs/x/container.env"]
    assert after(argv, "--ulimit") == ["nofile=1024:1024"]
    assert argv.index("--ulimit") < argv.index("localhost/app:1")  # the operator's, not the job's
    assert "--device" not in argv and "--volume" not in argv and "--privileged" not in argv
    assert not any("0123456789ab" in a for a in argv if a.startswith("FLEXMESH"))  # env: file


def test_a_network_is_given_only_when_asked_and_rootless_podman_keeps_the_users_id() -> None:
    assert after(build(run(network="host")).argv, "--network") == ["host"]
    rootless = build(run(rootless=True, user=(1000, 1000))).argv
    assert after(rootless, "--userns") == ["keep-id"]
    assert "--userns" not in build(run(runtime="docker", rootless=True)).argv
    with pytest.raises(ContainerError, match="image_network"):
        build(run(network="container:other"))


def test_nvidia_gpus_go_in_by_uuid_through_cdi_where_the_spec_names_them() -> None:
    cmd = build(run(devices=[gpu(), gpu(UUID2)], cdi_gpus=frozenset({UUID, UUID2, "0", "all"}),
                    env={"CUDA_VISIBLE_DEVICES": f"{UUID},{UUID2}"}))
    assert after(cmd.argv, "--device") == [f"nvidia.com/gpu={UUID}", f"nvidia.com/gpu={UUID2}"]
    assert "--gpus" not in cmd.argv
    assert cmd.env["NVIDIA_VISIBLE_DEVICES"] == f"{UUID},{UUID2}"  # never an image's "all"
    assert cmd.env["ASCEND_VISIBLE_DEVICES"] == ""  # nor an image's NPUs on an Ascend host
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == f"{UUID},{UUID2}"


def test_without_cdi_docker_uses_its_gpus_flag_and_podman_says_it_needs_cdi() -> None:
    one = build(run(runtime="docker", devices=[gpu()]))
    assert after(one.argv, "--gpus") == [f"device={UUID}"]
    two = build(run(runtime="docker", devices=[gpu(), gpu(UUID2)]))
    assert after(two.argv, "--gpus") == [f'"device={UUID},{UUID2}"']  # docker reads CSV
    with pytest.raises(ContainerError, match=r"CDI.*nvidia-ctk cdi generate"):
        build(run(devices=[gpu()]))
    with pytest.raises(ContainerError, match=f"does not name GPU {UUID}"):
        build(run(devices=[gpu()], cdi_gpus=frozenset({"0", "all"})))  # an index-named spec
    fallback = build(run(runtime="docker", devices=[gpu()], cdi_gpus=frozenset({"0"})))
    assert after(fallback.argv, "--gpus") == [f"device={UUID}"]


def test_ascend_npus_go_in_as_their_davinci_node_with_the_manager_devices() -> None:
    cmd = build(run(devices=[npu(3), npu(5)], ascend_dirs=["/usr/local/Ascend/driver"],
                    env={"ASCEND_RT_VISIBLE_DEVICES": "3,5"}))
    assert after(cmd.argv, "--device") == ["/dev/davinci3", "/dev/davinci5",
                                           "/dev/davinci_manager", "/dev/devmm_svm",
                                           "/dev/hisi_hdc"]
    assert after(cmd.argv, "--volume") == ["/usr/local/Ascend/driver:/usr/local/Ascend/driver:ro"]
    assert cmd.env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1"  # numbered from 0 inside
    assert cmd.env["NVIDIA_VISIBLE_DEVICES"] == "void"
    with pytest.raises(ContainerError, match="davinci node of NPU 'vnpu-100'"):
        build(run(devices=[replace(npu(0), id="vnpu-100")]))


def test_simulated_devices_pass_only_their_environment() -> None:
    sim = Device("gpu0", "gpu", "sim-gpu", 16384, "sim")
    cmd = build(run(devices=[sim], env={"FLEXMESH_DEVICE": "gpu0"}))
    assert "--device" not in cmd.argv and "--gpus" not in cmd.argv
    assert cmd.env == {"FLEXMESH_DEVICE": "gpu0", "NVIDIA_VISIBLE_DEVICES": "void",
                       "ASCEND_VISIBLE_DEVICES": ""}  # no image's own list widens either


def test_workdir_output_and_enforcement_files_are_mounted_and_named_as_inside() -> None:
    env = {"FLEXMESH_WORKDIR": "/var/lib/fm-work/j1", "FLEXMESH_OUTPUT": "/var/lib/fm-out/j1",
           "LD_PRELOAD": "/opt/hami/libvgpu.so", "CUDA_DEVICE_SM_LIMIT": "25"}
    cmd = build(run(env=env))
    assert after(cmd.argv, "--volume") == ["/var/lib/fm-work/j1:/flexmesh/work",
                                           "/var/lib/fm-out/j1:/flexmesh/output",
                                           "/opt/hami/libvgpu.so:/opt/hami/libvgpu.so:ro"]
    assert after(cmd.argv, "--workdir") == ["/flexmesh/work"]
    assert cmd.env["FLEXMESH_WORKDIR"] == "/flexmesh/work"
    assert cmd.env["FLEXMESH_OUTPUT"] == "/flexmesh/output"
    assert cmd.env["LD_PRELOAD"] == "/opt/hami/libvgpu.so"
    assert env["FLEXMESH_WORKDIR"] == "/var/lib/fm-work/j1"  # the caller's is left alone
    mps = build(run(env={"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}))
    assert after(mps.argv, "--volume") == ["/tmp/nvidia-mps:/tmp/nvidia-mps"]
    assert after(mps.argv, "--ipc") == ["host"]
    assert mps.env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"
    with pytest.raises(ContainerError, match="cannot mount"):
        build(run(env={"FLEXMESH_WORKDIR": "/a:/etc"}))


def test_the_env_file_carries_each_variable_on_a_line_and_refuses_a_line_break() -> None:
    assert env_file_text({"A": "1", "B": "x = y #z"}) == "A=1\nB=x = y #z\n"
    with pytest.raises(ContainerError, match="line break"):
        env_file_text({"A": "1\nB=2"})
    # (podman strips a name's leading blanks: a peer's "\tASCEND_VISIBLE_DEVICES" would
    # set the owner's own name past the reserved names' check)
    for name in ("\tASCEND_VISIBLE_DEVICES", " NVIDIA_VISIBLE_DEVICES", "A=B", "A\rB", ""):
        with pytest.raises(ContainerError, match="not a plain name"):
            env_file_text({name: "0-7"})


@pytest.mark.parametrize("image", ["", "-v", "--privileged", "a b", "x" * 600, "a;rm",
                                   "oci:/tmp/img", "dir:/root", "docker-archive:/etc/shadow",
                                   "oci-archive:img.tar", "containers-storage:busybox",
                                   "docker-daemon:busybox:1", "sif:/x.sif"])
def test_what_is_not_an_image_reference_is_refused(image: str) -> None:
    assert image_problem(image) is not None
    with pytest.raises(ContainerError):
        build(run(image=image))


def test_real_image_references_pass() -> None:
    for image in ("busybox", "localhost/flexmesh-test:1", "nvcr.io/nvidia/pytorch:24.01-py3",
                  "ghcr.io/a/b@sha256:" + "0" * 64, "docker://busybox:1", "localhost/dir:1",
                  "registry:5000/oci:2"):
        assert image_problem(image) is None


def test_submit_takes_an_image_and_a_network_only_with_it() -> None:
    fields = parse_submit({"command": ["true"], "image": "busybox"})
    assert (fields["image"], fields["image_network"]) == ("busybox", "none")
    assert parse_submit({"command": ["true"], "image": "busybox",
                         "image_network": "host"})["image_network"] == "host"
    assert parse_submit({"command": ["true"]})["image"] == ""
    for body, why in (({"image": "--privileged"}, "image reference"),
                      ({"image": 3}, "image reference"),
                      ({"image_network": "host"}, "only to a job with an image"),
                      ({"image": "busybox", "image_network": "weave"}, "one of none")):
        with pytest.raises(BadRequest, match=why):
            parse_submit({"command": ["true"], **body})


def test_cdi_specs_are_read_for_the_gpu_names_they_give(tmp_path: Path) -> None:
    assert cdi_gpu_names([str(tmp_path / "none")]) is None
    (tmp_path / "other.yaml").write_text("kind: vendor.com/fpga\ndevices:\n- name: f0\n")
    assert cdi_gpu_names([str(tmp_path)]) is None
    (tmp_path / "nvidia.yaml").write_text(
        "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n"
        f"- name: \"0\"\n  containerEdits: {{}}\n- name: {UUID}\n- name: all\n")
    (tmp_path / "mig.json").write_text(
        '{"kind": "nvidia.com/gpu", "devices": [{"name": "MIG-1234"}]}')
    assert cdi_gpu_names([str(tmp_path)]) == {"0", UUID, "all", "MIG-1234"}


def test_runtimes_are_gossiped_and_left_out_of_the_encoding_when_none() -> None:
    plain = facts.NodeFacts(priority=3)
    assert "rt" not in plain.encode()
    with_rt = replace(plain, runtimes=("podman", "docker"))
    assert facts.decode(with_rt.encode()) == with_rt
    assert facts.decode(plain.encode()).runtimes == ()
    junk = {**plain.encode(), "rt": ["podman", 7, "", "x" * 40, "podman", "a", "b", "c", "d"]}
    assert facts.decode(junk).runtimes == ("podman", "a", "b", "c")
    assert facts.decode({**plain.encode(), "rt": "podman"}).runtimes == ()


def _gpus(node: str) -> list[Candidate]:
    return [Candidate(node, "gpu0", "gpu", "sim-gpu", 1000, 16384, 1000, 16384)]


def test_the_coordinator_places_an_image_only_where_a_runtime_is() -> None:
    s = Scheduler(get_policy(DEFAULT_POLICY), spec=get_spec(DEFAULT_POLICY))
    s.no_runtime = frozenset({"bare"})
    view = {"bare": _gpus("bare")}
    s.enqueue(wire.Submit("img", "desk", 1000, 1024, "gpu", 0, 0, container=True), 0.0)
    s.enqueue(wire.Submit("plain", "desk", 1000, 1024, "gpu", 0, 0), 0.0)
    out = [p for p in s.propose(view, 0.0) if isinstance(p, Proposal)]
    assert [(p.job_id, p.placement.node) for p in out] == [("plain", "bare")]
    assert "podman or docker" in s.queue["img"].reason
    view = {"bare": _gpus("bare"), "boxed": _gpus("boxed")}
    out = [p for p in s.propose(view, 5.0) if isinstance(p, Proposal)]
    assert [(p.job_id, p.placement.node) for p in out] == [("img", "boxed")]


def test_containers_config_keys(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[containers]\nruntime = "podman"\n'
                    'extra_args = ["--ulimit", "nofile=1024:1024", "--runtime", "runc"]\n')
    s = load(str(conf), {}, env={})
    assert s.containers_runtime == "podman"
    assert s.containers_extra_args == ["--ulimit", "nofile=1024:1024", "--runtime", "runc"]
    assert load(None, {}, env={}).containers_runtime == "auto"
    conf.write_text('[containers]\nruntime = "lxc"\n')
    with pytest.raises(ConfigError, match=r"\[containers\] runtime must be"):
        load(str(conf), {}, env={})


def test_an_exit_code_of_the_runtimes_says_what_it_may_mean() -> None:
    from flexmesh.agent.containers import exit_hint

    assert "could not run the container" in exit_hint(125)
    assert "extra_args" in exit_hint(126) and "not found in the image" in exit_hint(127)
    assert exit_hint(0) == exit_hint(3) == exit_hint(None) == ""


def test_strays_are_removed_before_the_node_says_it_has_a_runtime(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At start the owner removes its containers that no adopted run names; until that is
    done it gossips no runtime, so no image job is started here that the clean-up would
    take for a stray (its container created between the listing and the removals)."""
    node = SimpleNamespace(name="n1", runtimes=(), published=0)
    node.publish_facts = lambda: setattr(node, "published", node.published + 1)
    agent = SimpleNamespace(settings=SimpleNamespace(containers_runtime="auto"), node=node)
    box = Containers(agent)  # type: ignore[arg-type]
    box.names["kept"] = "flexmesh-kept-L1"  # adopted after the restart
    calls: list[tuple[list[str], tuple[str, ...], str]] = []

    def call(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        calls.append((argv, node.runtimes, box.runtime))
        out = b"flexmesh-kept-L1\nflexmesh-old-L0\n" if argv[1] == "ps" else b""
        return subprocess.CompletedProcess(argv, 0, out, b"")

    monkeypatch.setattr(runtime_containers, "detect", lambda choice: ["podman"])
    monkeypatch.setattr(runtime_containers, "_call", call)

    async def no_images() -> None:
        return None

    monkeypatch.setattr(box, "refresh_images", no_images)  # (what it holds: another test)
    asyncio.run(box.start(lambda: ["kept"]))
    assert [argv[:2] for argv, _, _ in calls] == [["podman", "ps"], ["podman", "rm"]]
    assert calls[1][0][-1] == "flexmesh-old-L0"
    assert all(gossiped == () and used == "" for _, gossiped, used in calls)
    assert (node.runtimes, node.published, box.runtime) == (("podman",), 1, "podman")


def test_each_run_of_a_job_has_a_container_name_of_its_own() -> None:
    """Two leases of one node differ only in their token, after the node's name (up to
    64 characters): a name cut to a prefix of the lease gave every run the same one."""
    names = {container_name("0123456789ab", f"gpu-server-rack4-0017/{t}") for t in (7, 8)}
    assert len(names) == 2
    assert container_name("0123456789ab", "a1/9") == "flexmesh-0123456789ab-a1_9"


def test_a_failed_removal_of_an_ended_runs_container_is_tried_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The runtime failing ``rm -f`` once (a lock, a hiccup) must not leave the container
    of a cancelled job running on the devices its lease gave back."""
    agent = SimpleNamespace(settings=SimpleNamespace(), node=SimpleNamespace(name="n1"))
    box = Containers(agent)  # type: ignore[arg-type]
    box.runtimes = ("docker",)
    answers = [None, (125, b"Error: storage is locked"), (1, b"Error: No such container: x")]
    calls: list[list[str]] = []

    def call(argv: list[str]) -> subprocess.CompletedProcess[bytes] | None:
        calls.append(argv)
        answer = answers.pop(0)
        return None if answer is None else subprocess.CompletedProcess(argv, answer[0], b"",
                                                                       answer[1])

    monkeypatch.setattr(runtime_containers, "_call", call)
    monkeypatch.setattr(runtime_containers, "RM_RETRIES", (0.0, 0.0, 0.0))

    async def no_images() -> None:
        return None

    monkeypatch.setattr(box, "refresh_images", no_images)
    box.names["j1"] = "flexmesh-j1-n1_4"
    asyncio.run(box.ended("j1", tmp_path))
    assert calls == [["docker", "rm", "-f", "flexmesh-j1-n1_4"]] * 3 and answers == []
    answers[:] = [(125, b"Error: storage is locked")] * 4
    assert not asyncio.run(box.remove("flexmesh-j1-n1_5"))  # said so, after every try
