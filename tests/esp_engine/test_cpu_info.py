"""Reading /proc/cpuinfo: the first processor's model name and flags, in the order listed."""

from esp_engine.cpu_info import cpu_info, parse_cpu_info

TWO_PROCESSORS = (
    "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n"
    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
)


def test_the_first_processor_names_the_cpu():
    info = parse_cpu_info(TWO_PROCESSORS)
    assert info.model_name == "AMD EPYC 9R14"
    assert info.flags == ("fpu", "sse2", "avx512f", "avx512_bf16")


def test_without_cpuinfo_there_are_no_flags_but_still_a_name():
    info = parse_cpu_info("")
    assert info.flags == () and info.model_name


def test_this_machine_is_read_once():
    assert cpu_info() is cpu_info()
