#!/usr/bin/env bash
# Regenerates the autocast policy table of docs/numerics.md from the code (build/release must be built).
set -euo pipefail
cd "$(dirname "$0")/.."
tool=build/release/examples/mixprec_policy_table
[ -x "$tool" ] || cmake --build --preset release --target mixprec_policy_table
table=$("$tool")
python3 - "$table" <<'PY'
import re, sys
table = sys.argv[1] + "\n"
readme = open("docs/numerics.md").read()
new = re.sub(r"(<!-- policy-table:begin -->\n).*?(<!-- policy-table:end -->)", lambda m: m.group(1) + table + m.group(2), readme, flags=re.S)
open("docs/numerics.md", "w").write(new)
PY
echo "docs/numerics.md policy table updated"
