"""Run every example of docs/language.md in document order in a fresh directory.

```attn     -> saved (name from a leading '# file: NAME' line, else exNN.attn); `attndsl check`
               must pass unless the name starts with 'bad'
```python   -> run with python; must exit 0
```console  -> '$ cmd' lines run with bash (stdout+stderr); the following lines are the
               expected output, compared exactly (trailing spaces ignored). --fill rewrites them.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DOC = Path(sys.argv[1])
FILL = "--fill" in sys.argv
text = DOC.read_text()
lines = text.split("\n")
work = Path(tempfile.mkdtemp(prefix="docex_"))
env = dict(os.environ, MPLBACKEND="Agg", COLUMNS="100")
out_lines = []
i = 0
n_attn = n_py = n_cmd = 0
failures = 0
while i < len(lines):
    line = lines[i]
    m = re.match(r"^```(\w+)\s*$", line)
    if not m:
        out_lines.append(line)
        i += 1
        continue
    lang = m.group(1)
    j = i + 1
    while not lines[j].startswith("```"):
        j += 1
    body = lines[i + 1 : j]
    start_line = i + 1
    out_lines.append(line)
    if lang == "attn":
        n_attn += 1
        name = f"ex{n_attn:02d}.attn"
        if body and body[0].startswith("# file: "):
            name = body[0][len("# file: ") :].strip()
        p = work / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(body) + "\n")
        if not Path(name).name.startswith("bad"):
            r = subprocess.run(
                ["attndsl", "check", name], cwd=work, capture_output=True, text=True, env=env
            )
            if r.returncode != 0:
                failures += 1
                print(f"FAIL attn block at line {start_line} ({name}):\n{r.stdout}{r.stderr}")
        out_lines.extend(body)
    elif lang == "python":
        n_py += 1
        p = work / f"snippet{n_py:02d}.py"
        p.write_text("\n".join(body) + "\n")
        r = subprocess.run(
            [sys.executable, p.name], cwd=work, capture_output=True, text=True, env=env
        )
        if r.returncode != 0:
            failures += 1
            print(f"FAIL python block at line {start_line}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        out_lines.extend(body)
    elif lang == "console":
        k = 0
        new_body = []
        while k < len(body):
            if not body[k].startswith("$ "):
                failures += 1
                print(f"FAIL console block at line {start_line}: expected '$ ' at {body[k]!r}")
                break
            cmd = body[k][2:]
            while cmd.endswith("\\"):
                k += 1
                cmd = cmd[:-1] + "\n" + body[k]
            new_body.extend(body[k - cmd.count("\n") : k + 1])
            k += 1
            expected = []
            while k < len(body) and not body[k].startswith("$ "):
                expected.append(body[k])
                k += 1
            n_cmd += 1
            r = subprocess.run(
                ["bash", "-c", cmd + " 2>&1"], cwd=work, capture_output=True, text=True, env=env
            )
            got = (
                [x.rstrip() for x in r.stdout.rstrip("\n").split("\n")] if r.stdout.strip() else []
            )
            if [x.rstrip() for x in expected] != got:
                if FILL:
                    print(f"filled output of '{cmd}' at line {start_line}")
                else:
                    failures += 1
                    print(
                        f"FAIL console at line {start_line}: {cmd}\n--- expected\n"
                        + "\n".join(expected)
                        + "\n--- got\n"
                        + "\n".join(got)
                    )
            new_body.extend(got if FILL else expected)
        out_lines.extend(new_body)
    else:
        out_lines.extend(body)
    out_lines.append(lines[j])
    i = j + 1
if FILL:
    DOC.write_text("\n".join(out_lines))
print(
    f"{n_attn} attn blocks, {n_py} python blocks, {n_cmd} commands; {failures} failures; "
    f"workdir {work}"
)
sys.exit(1 if failures else 0)
