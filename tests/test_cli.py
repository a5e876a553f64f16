"""The `hybrid` command line: help, errors, `hybrid run`, and `hybrid chat` in a pseudo-terminal."""

import os
import re
import subprocess
import sys

import pytest

from hybrid.cli import main as cli
from hybrid.cli.chat import read_message

HYBRID = [sys.executable, "-m", "hybrid"]
FAST = ["--rules", "torch-cpu", "--temperature", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TERM="dumb", COLUMNS="200")  # one torch thread: robust on a busy machine


def test_help_documents_run_and_chat(capsys):
    for argv, words in ((["--help"], ["run", "chat"]),
                        (["run", "--help"], ["--prompt", "--raw", "--model", "--rules", "--ctx", "--system",
                                             "--temperature", "--top-p", "--top-k", "--min-p", "--repeat-penalty",
                                             "--presence-penalty", "--frequency-penalty", "--seed", "--max-tokens",
                                             "--stop"]),
                        (["chat", "--help"], ["/reset", "/exit", '"""', "--system", "--stop", "--seed"])):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words), (argv, [w for w in words if w not in out])


@pytest.mark.parametrize("argv, message", [
    (["run", "--prompt", "hi", "--temperature", "9"], "temperature must be in [0, 2]"),
    (["run", "--prompt", "hi", "--top-k", "many"], "invalid int value"),
    (["chat", "--ctx", "1"], "must be at least 2"),
    (["run", "--prompt", "hi", "--model", "/no/such/model.gguf"], "no such file"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_model_exits_2_from_the_console():
    r = subprocess.run([*HYBRID, "run", "--prompt", "hi", "--model", "/no/such/model.gguf"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "hybrid run: error: /no/such/model.gguf: no such file or directory"


def test_run_prints_an_answer(smollm_path):
    r = subprocess.run([*HYBRID, "run", "--prompt", "What is the capital of France?", "--max-tokens", "20", *FAST],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_read_message_continuations():
    def reader(lines):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(reader(["one line"])) == "one line"
    assert read_message(reader(["first \\", "second"])) == "first \nsecond"
    assert read_message(reader(['"""', "a", "b", '"""'])) == "a\nb"
    assert read_message(reader(['"""a', 'b"""'])) == "a\nb"


def test_chat_in_a_terminal(smollm_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "hybrid", "chat", "--max-tokens", "24", *FAST],
                          env=ENV, encoding="utf-8", timeout=180)
    try:
        stats = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s \(prompt: (\d+) tokens")

        def ask(text):
            child.expect_exact(">>> ")
            child.sendline(text)
            child.expect(stats)
            return child.before, int(child.match.group(2))

        answer, first_prompt = ask("What is the capital of France?")
        assert "Paris" in answer
        _, second_prompt = ask("What is the capital of France?")
        assert second_prompt > first_prompt  # the history is in the prompt
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("cleared")
        _, after_reset = ask("What is the capital of France?")
        assert after_reset == first_prompt
        # a line ending in a backslash continues the message
        child.expect_exact(">>> ")
        child.sendline("What is the capital \\")
        child.expect_exact("... ")
        child.sendline("of France?")
        child.expect(stats)
        assert int(child.match.group(2)) > first_prompt
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_stops_the_answer_and_ctrl_d_leaves(smollm_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "hybrid", "chat", "--max-tokens", "3000", *FAST],
                          env=ENV, encoding="utf-8", timeout=180)
    try:
        child.expect_exact(">>> ")
        child.sendline("Write a very long story about a dragon.")
        child.expect_exact("dragon.\r\n")  # the echo
        child.expect(r"\w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect_exact("(stopped)", timeout=30)
        child.expect_exact(">>> ")
        child.sendintr()  # at the prompt: a hint, not an exit
        child.expect_exact("/exit or Ctrl-D")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
