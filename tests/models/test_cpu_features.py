"""ssm_llm.cpu_features reads the model and the matmul-relevant flags from /proc/cpuinfo text."""

from ssm_llm.cpu_features import CPUFeatures, host_cpu, parse_cpuinfo

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: some other name
flags\t\t: fpu
"""
EPYC_AVX2 = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp sve i8mm bf16\nCPU part\t: 0xd40\n"


def test_intel_with_amx_has_int8_dot_and_bf16():
    cpu = parse_cpuinfo(XEON_AMX)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"  # the first processor's
    assert cpu.int8_dot == ("avx512_vnni", "amx_int8")
    assert cpu.bf16 == ("avx512_bf16", "amx_bf16")
    assert "fpu" not in cpu.flags and "avx2" in cpu.flags  # only the recorded flags are kept


def test_avx2_only_cpu_has_neither():
    cpu = parse_cpuinfo(EPYC_AVX2)
    assert (cpu.model, cpu.int8_dot, cpu.bf16) == ("AMD EPYC 7B12", (), ())
    assert cpu.as_json() == {"cpu": "AMD EPYC 7B12", "cpu_flags": ["avx2", "fma"], "int8_dot": [], "bf16": []}


def test_arm_features_line_is_read():
    cpu = parse_cpuinfo(ARM)
    assert cpu.int8_dot == ("asimddp", "i8mm") and cpu.bf16 == ("bf16",)
    assert cpu.model  # no "model name" line: the platform's processor name or "unknown"


def test_empty_text_and_the_host_give_a_description():
    assert parse_cpuinfo("").flags == frozenset()
    assert isinstance(host_cpu(), CPUFeatures) and isinstance(host_cpu().as_json()["cpu"], str)
