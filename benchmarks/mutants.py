"""Mutation testing of the exercises' tests, run by hand (not in CI):

    python benchmarks/mutants.py              # every exercise; a table of kill rates
    python benchmarks/mutants.py 3 8 -v       # exercises 3 and 8, each mutant listed

Each mutant is the exercise's solution (the project's own function) with one small change to its
body: an arithmetic operator swapped, a comparison flipped, min/max swapped, a sign flipped, a
constant moved by one, a term dropped, an index moved by one, a .detach() removed (or a boolean
flipped, `and`/`or` swapped, a method swapped for its near neighbour). The mutant is compiled in
its module's namespace and put in place of the function; the exercise's tests are called in this
process; a mutant is killed when one of them fails (raises). Mutants that do not compile or whose
source equals the solution's are not counted.
"""

import argparse
import ast
import copy
import importlib
import inspect
import os
import sys
import textwrap
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "exercises")]

from make import EXERCISES  # noqa: E402

ARITH = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult]}
ARITH |= {ast.Pow: [ast.Mult], ast.BitAnd: [ast.BitOr], ast.BitOr: [ast.BitAnd]}
COMPARE = {
    ast.Lt: [ast.LtE, ast.Gt],
    ast.LtE: [ast.Lt, ast.Gt],
    ast.Gt: [ast.GtE, ast.Lt],
    ast.GtE: [ast.Gt, ast.Lt],
    ast.Eq: [ast.NotEq],
    ast.NotEq: [ast.Eq],
    ast.Is: [ast.IsNot],
    ast.IsNot: [ast.Is],
}
MINMAX = {"min": "max", "max": "min", "amin": "amax", "amax": "amin"}
MINMAX |= {"minimum": "maximum", "maximum": "minimum"}
NEIGHBOURS = {"fullmatch": ["match", "search"], "log_softmax": ["softmax"]}
NEIGHBOURS |= {"softmax": ["log_softmax"], "cumsum": ["cumprod"], "mean": ["sum"], "sum": ["mean"]}


def mutations(fn):
    """(kind, description, mutated FunctionDef) for each single change to the body of `fn`."""
    nodes = [n for stmt in fn.body for n in ast.walk(stmt)]
    for i, node in enumerate(nodes):
        for kind, desc, change in node_mutations(node):
            mutant = copy.deepcopy(fn)
            target = [n for stmt in mutant.body for n in ast.walk(stmt)][i]
            change(target)
            yield kind, f"line {getattr(node, 'lineno', '?')}: {desc}", mutant


def node_mutations(node):
    """(kind, description, in-place change) for one AST node."""
    if isinstance(node, ast.BinOp):
        for new in ARITH.get(type(node.op), []):
            yield "arithmetic", f"{type(node.op).__name__} -> {new.__name__}", setter("op", new())
        if isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            yield "dropped term", f"drop the right of {ast.unparse(node)}", replace(node.left)
            yield "dropped term", f"drop the left of {ast.unparse(node)}", replace(node.right)
    if isinstance(node, ast.Compare):
        for j, op in enumerate(node.ops):
            for new in COMPARE.get(type(op), []):
                desc = f"{type(op).__name__} -> {new.__name__} in {ast.unparse(node)}"
                yield "comparison", desc, set_op(j, new())
    if isinstance(node, ast.BoolOp):
        new = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield "comparison", f"and/or in {ast.unparse(node)}", setter("op", new)
    if isinstance(node, ast.Name) and node.id in MINMAX:
        yield "min/max", f"{node.id} -> {MINMAX[node.id]}", setter("id", MINMAX[node.id])
    if isinstance(node, ast.Attribute) and node.attr in MINMAX:
        yield "min/max", f".{node.attr} -> .{MINMAX[node.attr]}", setter("attr", MINMAX[node.attr])
    if isinstance(node, ast.keyword) and node.arg in MINMAX:
        yield "min/max", f"{node.arg}= -> {MINMAX[node.arg]}=", setter("arg", MINMAX[node.arg])
    if isinstance(node, ast.Attribute) and node.attr in NEIGHBOURS:
        for new in NEIGHBOURS[node.attr]:
            yield "method", f".{node.attr} -> .{new}", setter("attr", new)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield "sign", f"drop the minus of {ast.unparse(node)}", replace(node.operand)
    if isinstance(node, (ast.Return, ast.Assign)) and node.value is not None:
        yield "sign", f"negate {ast.unparse(node.value)[:60]}", negate_value
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        for d in (1, -1):
            yield (
                "constant",
                f"{node.value!r} -> {node.value + d!r}",
                setter("value", node.value + d),
            )
    if isinstance(node, ast.Constant) and type(node.value) is bool:
        yield "constant", f"{node.value} -> {not node.value}", setter("value", not node.value)
    if isinstance(node, ast.Subscript):
        for d in (1, -1):
            yield "index", f"{ast.unparse(node)} index {d:+d}", shift_index(d)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "detach":
            yield "detach", f"remove .detach() in {ast.unparse(node)}", replace(node.func.value)


def setter(field, value):
    return lambda n: setattr(n, field, value)


def set_op(j, op):
    return lambda n: n.ops.__setitem__(j, op)


def replace(other):
    """Turn the node into a copy of `other` (one of its children)."""
    other = copy.deepcopy(other)

    def change(n):
        n.__class__ = other.__class__
        n.__dict__.clear()
        n.__dict__.update(other.__dict__)

    return change


def negate_value(n):
    if isinstance(n.value, ast.Tuple):  # negate the first of (value, ...)
        n.value.elts[0] = ast.UnaryOp(ast.USub(), n.value.elts[0])
    else:
        n.value = ast.UnaryOp(ast.USub(), n.value)


def shift_index(d):
    """Move the first integer-like index (or slice bound) of a subscript by d."""

    def change(n):
        s = n.slice
        parts = s.elts if isinstance(s, ast.Tuple) else [s]
        for k, p in enumerate(parts):
            if isinstance(p, ast.Slice):
                for bound in ("upper", "lower"):
                    if getattr(p, bound) is not None:
                        setattr(p, bound, ast.BinOp(getattr(p, bound), ast.Add(), ast.Constant(d)))
                        return
            elif not (isinstance(p, ast.Constant) and p.value is None):
                new = ast.BinOp(p, ast.Add(), ast.Constant(d))
                if isinstance(s, ast.Tuple):
                    s.elts[k] = new
                else:
                    n.slice = new
                return

    return change


# The plausible wrong answers, written as a student might: each must fail its tests.
PLAUSIBLE = [
    (
        1,
        "biased std (ddof 0)",
        """
rg = r.view(-1, G)
A = (rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True, unbiased=False) + eps)
return (A * (rg.amax(1, keepdim=True) > rg.amin(1, keepdim=True))).reshape(-1)
""",
    ),
    (
        1,
        "an all-equal group left to rounding",
        """
rg = r.view(-1, G)
return ((rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True) + eps)).reshape(-1)
""",
    ),
    (
        2,
        "grpo normalised per micro-batch of 2",
        """
return mask / mask.sum(1, keepdim=True).clamp(min=1) / 2
""",
    ),
    (
        2,
        "token mean per completion",
        """
return mask / mask.sum(1, keepdim=True).clamp(min=1)
""",
    ),
    (
        3,
        "max for min",
        """
rho = torch.exp(logp - logp_old)
L = -torch.max(rho * A, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A)
return L, (rho < 1 - eps_low) | (rho > 1 + eps_high)
""",
    ),
    (
        3,
        "a sign",
        """
rho = torch.exp(logp - logp_old)
L = torch.min(rho * A, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A)
return L, ((rho < 1 - eps_low) & (A < 0)) | ((rho > 1 + eps_high) & (A > 0))
""",
    ),
    (4, "k1 for k3", "return logp - logp_ref"),
    (4, "k2 for k3", "return 0.5 * (logp_ref - logp) ** 2"),
    (
        5,
        "the EOS dropped from the mask",
        """
is_eos = completion_ids == eos_id
L = completion_ids.shape[1]
first = torch.where(is_eos.any(1), is_eos.int().argmax(1), L)
return (torch.arange(L)[None] < first[:, None]).float()
""",
    ),
    (
        6,
        "the temperature left out",
        """
cdf = logits.double().softmax(-1).cumsum(-1)
return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
""",
    ),
    (
        7,
        "the temperature left out",
        """
return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
""",
    ),
    (
        8,
        "a box left in the model's coordinate space",
        """
box = parse_box(completion)
if box is None:
    return 0.0
iou = box_iou(box, [float(v) for v in gt["solution"]])
return iou if iou >= gt.get("iou_threshold", 0.0) else 0.0
""",
    ),
    (
        9,
        "search for fullmatch",
        """
return 1.0 if isinstance(completion, str) and FORMAT_RE.search(completion) else 0.0
""",
    ),
    (
        10,
        "the token mean over the batch",
        """
s = torch.exp(((logp - logp_old) * mask).sum(1, keepdim=True) / mask.sum())
L = -torch.min(s * A, torch.clamp(s, 1 - eps_low, 1 + eps_high) * A)
clipped = ((s < 1 - eps_low) & (A < 0)) | ((s > 1 + eps_high) & (A > 0))
return L, clipped.expand_as(logp)
""",
    ),
]


def run_tests(module):
    """None if every test of the module passes, else the first failure's name and error."""
    for name, test in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_"):
            continue
        params = getattr(test, "pytestmark", [])
        cases = [()]
        for mark in params:
            if mark.name == "parametrize":
                cases = [(v,) for v in mark.args[1]]
        for case in cases:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    test(*case)
            except Exception as e:  # an assertion, or the mutant's own crash: killed either way
                return f"{name}{case}: {type(e).__name__}"
    return None


def mutate_exercise(number, file, function, verbose):
    module = importlib.import_module(file[:-3])
    original = getattr(module, function)
    tree = ast.parse(textwrap.dedent(inspect.getsource(original)))
    fn = tree.body[0]
    fn.decorator_list = []
    tests = importlib.import_module(
        next(
            f[:-3]
            for f in os.listdir(os.path.join(ROOT, "exercises"))
            if f.startswith(f"test_ex{number}_")
        )
    )
    assert run_tests(tests) is None, f"exercise {number}: the solution fails its own tests"
    base = ast.unparse(fn)
    results, seen = [], {base}
    wrong = []  # the plausible wrong answers: fn's signature, the body as written above
    for n, desc, body in PLAUSIBLE:
        if n == number:
            wrong.append(
                (
                    "plausible",
                    desc,
                    f"def {function}{signature(original)}:\n"
                    + textwrap.indent(body.strip("\n"), "    "),
                )
            )
    mutants = [(k, d, ast.unparse(ast.fix_missing_locations(m))) for k, d, m in mutations(fn)]
    for kind, desc, source in mutants + wrong:
        if source in seen:
            continue
        seen.add(source)
        namespace = dict(vars(module))
        try:
            exec(compile(source, f"<mutant of {function}>", "exec"), namespace)
        except Exception:
            continue
        setattr(module, function, namespace[function])
        try:
            failure = run_tests(tests)
        finally:
            setattr(module, function, original)
        results.append((kind, desc, failure))
        if verbose:
            print(
                f"  ex{number} {'killed ' if failure else 'SURVIVED'} {kind:12s} {desc}", flush=True
            )
    return results


def signature(fn):
    return str(inspect.signature(fn))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("numbers", nargs="*", type=int, help="exercises (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every mutant")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    total = killed = 0
    rows = []
    for number, file, function, _ in EXERCISES:
        if a.numbers and number not in a.numbers:
            continue
        results = mutate_exercise(number, file, function, a.verbose)
        plausible = [r for r in results if r[0] == "plausible"]
        results = [r for r in results if r[0] != "plausible"]
        for _, desc, failure in plausible:
            print(f"exercise {number}, {desc}: {'caught' if failure else 'NOT CAUGHT'} ({failure})")
        k = sum(1 for r in results if r[2])
        total, killed = total + len(results), killed + k
        survivors = [f"{kind}: {desc}" for kind, desc, failure in results if not failure]
        rows.append((number, f"{file}:{function}", len(results), k, survivors))
    print("\n| exercise | function | mutants | killed | rate |\n|---|---|---|---|---|")
    for number, name, n, k, _ in rows:
        print(f"| {number} | `{name}` | {n} | {k} | {k / max(n, 1):.0%} |")
    print(f"| all | | {total} | {killed} | {killed / max(total, 1):.1%} |")
    for number, name, _, _, survivors in rows:
        for s in survivors:
            print(f"survivor, exercise {number} ({name}): {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
