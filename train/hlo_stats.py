"""What a compiled step does per chip, read from its optimized HLO text: collectives, HBM traffic,
the largest arrays, each counted as often as it runs.

XLA's own cost analysis counts a while loop's body once, so a scanned 32-layer model looks like a
1-layer one. Here every computation gets a multiplicity: 1 for the entry, the trip count of each
while loop that runs it (its condition `i < N` less the value i starts from: XLA peels a scan's
first iteration out of the loop, which then counts from 1), the caller's for calls, conditionals
and async wrappers. The HLO is SPMD-partitioned, so every shape in it is one device's shape.

A collective is asynchronous when it is split into -start / -done, runs in an async wrapper, or
(TPU) is marked so (`async_collective_name`) or is one of a chain of continuation fusions
(`chain_id`): XLA:TPU fuses an async collective into a start, compute fusions it overlaps, and a
done, each holding a copy of the collective; it is counted once, in the start.

Asynchronous is not yet overlapped: a start whose done follows it with no compute scheduled in
between (no dot, convolution or kernel, in the same computation) is waited for all the same. Such
a collective's bytes count as `exposed_*`; a chain of continuation fusions fuses its compute.

A collective's result bytes say little about the link traffic: a reduce-scatter over g chips
returns 1/g of what each chip sends. Each one's ICI bytes are what one chip sends in a ring
(bandwidth-optimal) algorithm over its group of g chips (`replica_groups`): an all-gather or an
all-to-all (g - 1)/g of its result, a reduce-scatter (g - 1) times its result, an all-reduce (a
reduce-scatter then an all-gather) 2 (g - 1)/g, a collective-permute its result.
"""
import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
               "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no HBM bytes of their own.
NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional",
              "call", "after-all", "partition-id", "replica-id", "opt-barrier", "async-start", "async-update",
              "async-done", "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done",
              "send-done", "recv-done"}

_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# replica_groups as a mesh ("mesh['axis_0'=4,'axis_1'=32] {'axis_1'}"), an iota list ("[4,32]<=[128]")
# or explicit groups ("{{0,1},{2,3}}"); none (or "{}"): every device.
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def array_bytes(shape: str) -> float:
  """Bytes of every array in a shape string, e.g. "(f32[2,3]{1,0}, s32[])" -> 28."""
  return sum(DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _ARRAY.findall(shape))


@dataclasses.dataclass
class Instr:
  name: str
  shape: str       # result shape text
  opcode: str
  operands: list   # names of operand instructions
  args: str        # the text between the parentheses (a constant's value)
  rest: str        # attributes after the operands


def _split_shape(text: str) -> tuple[str, str]:
  """"(a, b) op(...)..." or "f32[2]{0} op(...)" -> (shape, the rest)."""
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return text[:i + 1], text[i + 2:]
  shape, _, rest = text.partition(" ")
  return shape, rest


def _parse_instr(line: str) -> Instr:
  m = _INSTR.match(line)
  shape, rest = _split_shape(line[m.end():])
  opcode, _, args = rest.partition("(")
  depth, i = 1, 0
  while depth and i < len(args):
    depth += (args[i] == "(") - (args[i] == ")")
    i += 1
  inside = args[:i - 1]
  return Instr(m.group(1), shape, opcode.strip(), re.findall(r"%([\w.\-]+)", inside), inside, args[i:])


def parse(hlo: str) -> tuple[dict, str]:
  """{computation name: [Instr]} and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      comps[current] = []
      entry = current if header.group(1) else entry
    elif current is not None and _INSTR.match(line):
      comps[current].append(_parse_instr(line))
  return comps, entry


def _counter(cond: list):
  """(N, the tuple index of i) of a loop condition `i < N`; None when it is not that simple."""
  by_name = {i.name: i for i in cond}
  for ins in cond:
    if ins.opcode == "compare" and "direction=LT" in ins.rest and len(ins.operands) == 2:
      i, n = (by_name.get(op) for op in ins.operands)
      if n is not None and n.opcode == "constant" and re.fullmatch(r"-?\d+", n.args.strip()):
        index = re.search(r"index=(\d+)", i.rest) if i is not None and i.opcode == "get-tuple-element" else None
        return int(n.args), int(index.group(1)) if index else None
  return None


def _start(caller: list, loop: Instr, index) -> int:
  """The value the counter at tuple `index` starts from: the constant (through copies) the loop's
  initial tuple holds there, in its caller's instructions; 0 when that is not what is there. XLA
  peels a scan's first iteration out of its loop, which then counts from 1."""
  by_name = {i.name: i for i in caller}
  init = by_name.get(loop.operands[0]) if loop.operands else None
  if index is None or init is None or init.opcode != "tuple" or index >= len(init.operands):
    return 0
  value = by_name.get(init.operands[index])
  while value is not None and value.opcode in ("copy", "bitcast") and value.operands:
    value = by_name.get(value.operands[0])
  if value is not None and value.opcode == "constant" and re.fullmatch(r"-?\d+", value.args.strip()):
    return int(value.args)
  return 0


def trip_count(cond: list, caller: list = (), loop: Instr = None) -> int:
  """Iterations of a while loop with condition `i < N`: N less the value i starts from (`_start`;
  given the loop instruction and its caller's instructions, else 0); 1 when it is not that simple."""
  counter = _counter(cond)
  if counter is None:
    return 1
  bound, index = counter
  return max(bound - (_start(caller, loop, index) if loop is not None else 0), 1)


def multiplicities(comps: dict, entry: str) -> tuple[dict, set, set, dict]:
  """(how often each computation runs per step, the fused ones, the async-wrapped ones, the name of
  an instruction calling each)."""
  mult, fused, wrapped, callers = defaultdict(float), set(), set(), {}
  mult[entry] = 1.0
  order = [entry]
  for name in order:  # callers come before callees in this walk
    for ins in comps.get(name, []):
      called = _CALLED.findall(ins.rest)
      branches = _BRANCHES.search(ins.rest)
      if branches:
        called += [("branch", b.strip().lstrip("%")) for b in branches.group(1).split(",")]
      for role, callee in called:
        if callee not in comps:
          continue
        times = mult[name]
        if ins.opcode == "while" and role == "body":
          cond = dict(_CALLED.findall(ins.rest)).get("condition")
          times *= trip_count(comps.get(cond, []), comps[name], ins)
        if ins.opcode == "fusion" or role == "to_apply":
          fused.add(callee)
        if ins.opcode.startswith("async-") or ins.opcode.endswith("-start"):
          wrapped.add(callee)
        mult[callee] += times
        callers.setdefault(callee, ins.name)
        if callee not in order:
          order.append(callee)
  return mult, fused, wrapped, callers


def group_size(rest: str, n: int) -> int:
  """Chips in each replica group of a collective (its attributes `rest`), of n partitions."""
  m = _MESH_GROUPS.search(rest)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = _IOTA_GROUPS.search(rest)
  if m:
    return int(m.group(1).split(",")[-1])
  m = _LIST_GROUPS.search(rest)
  return len(m.group(1).split(",")) if m else n


def ici_bytes(kind: str, result_bytes: float, g: int) -> float:
  """Bytes one chip sends for a collective of `result_bytes` over a group of g chips (above)."""
  if kind == "collective-permute":
    return result_bytes
  per_result = {"reduce-scatter": g - 1, "all-reduce": 2 * (g - 1) / g}.get(kind, (g - 1) / g)
  return per_result * result_bytes


def _kind(opcode: str):
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def _traffic(ins: Instr, op_name: str, sizes: dict) -> float:
  """HBM bytes one instruction reads and writes. A slice of a stacked buffer (the scanned layers'
  weights, activations, gradients) moves the slice, not the stack: reading one reads the slice's
  bytes; an in-place update writes them (the stack is the largest operand, aliased to the result)."""
  operands = [sizes.get(op, 0.0) for op in ins.operands]
  if "dynamic_update_slice" in op_name or ins.opcode == "dynamic-update-slice":
    return 2 * (sum(operands) - max(operands, default=0.0))
  if "dynamic_slice" in op_name or ins.opcode == "dynamic-slice":
    return 2 * sizes[ins.name]
  return sizes[ins.name] + sum(operands)


def _computes_itself(ins: Instr) -> bool:
  return ins.opcode in ("dot", "convolution") or 'custom_call_target="tpu_custom_call"' in ins.rest


def _computes(comps: dict) -> set:
  """Names of the computations that run a dot, a convolution or a kernel (a custom call into a TPU
  kernel), themselves or in a computation they call."""
  calls = {name: {c for _, c in _CALLED.findall(" ".join(i.rest for i in instrs))} for name, instrs in comps.items()}
  found = {name for name, instrs in comps.items() if any(_computes_itself(i) for i in instrs)}
  grew = True
  while grew:
    more = {name for name, called in calls.items() if called & found} - found
    found |= more
    grew = bool(more)
  return found


def exposed_starts(comps: dict) -> set:
  """Names of the asynchronous starts (a collective's -start, or an async call / call-start into
  one) whose done follows with no compute scheduled in between (`_computes`): asynchronous, but
  nothing to overlap. The text of a scheduled module lists each computation in its schedule."""
  computing = _computes(comps)
  exposed = set()
  for instrs in comps.values():
    for k, ins in enumerate(instrs):
      if not (ins.opcode.endswith("-start") or ins.opcode == "async-start"):
        continue
      for later in instrs[k + 1:]:
        if later.opcode.endswith("-done") and ins.name in later.operands:
          exposed.add(ins.name)
          break
        if _computes_itself(later) or {c for _, c in _CALLED.findall(later.rest)} & computing:
          break
  return exposed


@dataclasses.dataclass
class Run:
  """One collective of the program: kind, result shape, runs per step, result and ICI bytes per
  run, asynchronous, and asynchronous with no compute to overlap (exposed)."""
  kind: str
  shape: str
  times: float
  nbytes: float
  sent: float
  is_async: bool
  exposed: bool


def collective_runs(comps: dict, entry: str, n: int) -> list:
  """Every collective of a parsed module compiled for n chips as a Run, each counted once (a chain
  of continuation fusions in its start)."""
  mult, _, wrapped, callers = multiplicities(comps, entry)
  exposed = exposed_starts(comps)
  runs = []
  for name, instrs in comps.items():
    times = mult.get(name, 0.0)
    for ins in instrs if times else ():
      kind = _kind(ins.opcode)
      chained = "chain_id=" in ins.rest
      if not kind or (chained and not callers.get(name, "").startswith("async-collective-start")):
        continue  # not a collective, or a continuation or done of a chain: counted in its start
      shape = ins.shape
      if ins.opcode.endswith("-start") and shape.startswith("("):  # (operand, result[, ...]) -> result
        found = _ARRAY.findall(shape)
        dtype, dims = found[1] if len(found) > 1 else found[0]
        shape = f"{dtype}[{dims}]"
      nbytes = array_bytes(shape)
      is_async = (ins.opcode.endswith("-start") or name in wrapped or chained
                  or "async_collective_name=" in ins.rest)
      start = ins.name if ins.opcode.endswith("-start") else callers.get(name)
      runs.append(Run(kind, shape, times, nbytes, ici_bytes(kind, nbytes, group_size(ins.rest, n)),
                      is_async, is_async and start in exposed))
  return runs


def stats(hlo: str, n: int, top: int = 8) -> dict:
  """Collectives {kind: {count, bytes, async_bytes, ici_bytes, async_ici_bytes, exposed_ici_bytes}}
  (bytes: of the results; exposed: asynchronous with no compute to overlap), hbm_bytes and the
  largest arrays, per chip per step, of an optimized (SPMD-partitioned) HLO module's text compiled
  for n chips."""
  comps, entry = parse(hlo)
  mult, fused, _, _ = multiplicities(comps, entry)
  fields = ("count", "bytes", "async_bytes", "ici_bytes", "async_ici_bytes", "exposed_ici_bytes")
  collectives = {k: dict.fromkeys(fields, 0.0) for k in COLLECTIVES}
  for run in collective_runs(comps, entry, n):
    c = collectives[run.kind]
    c["count"] += run.times
    c["bytes"] += run.times * run.nbytes
    c["ici_bytes"] += run.times * run.sent
    c["async_bytes"] += run.times * run.nbytes * run.is_async
    c["async_ici_bytes"] += run.times * run.sent * run.is_async
    c["exposed_ici_bytes"] += run.times * run.sent * run.exposed
  hbm, largest = 0.0, {}
  for name, instrs in comps.items():
    times = mult.get(name, 0.0)
    if not times or name in fused:
      continue
    sizes = {i.name: array_bytes(i.shape) for i in instrs}
    for ins in instrs:
      if ins.opcode in NO_TRAFFIC:
        continue
      op = _OP_NAME.search(ins.rest)
      op = op.group(1) if op else ins.opcode
      hbm += times * _traffic(ins, op, sizes)
      if not ins.shape.startswith("("):
        key = (ins.shape.split("{")[0], op)
        largest[key] = sizes[ins.name]
  biggest = sorted(largest.items(), key=lambda kv: -kv[1])[:top]
  return {"collectives": collectives, "hbm_bytes": hbm,
          "largest_buffers": [{"shape": s, "bytes": int(b), "op": op} for (s, op), b in biggest]}
