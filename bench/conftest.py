"""Benchmarks: real shapes on a GPU, tiny ones under the Triton interpreter on the CPU (so that CI
runs every benchmark once, quickly). A summary of ratios against the peers of each group is
printed at the end of the run; bench/report.py writes the same from --benchmark-json."""
from tests.support.env import HAS_CUDA, skip_gpu_items  # first: before pixtral_fast

from bench.timing import RESULTS, ratio_table  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu_items(items)


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.write_sep("-", "pixtral_fast vs peers (same run; x>1: the peer is slower)")
        if not HAS_CUDA:
            terminalreporter.write_line("CPU run: our kernels ran in Triton's interpreter, so these ratios only "
                                        "show that every benchmark runs; speed is measured on a GPU")
        for line in ratio_table(RESULTS):
            terminalreporter.write_line(line)
