"""``secateurs methods``: the registered methods, one line each, and how each meets a target ratio."""


def register(sub):
    p = sub.add_parser("methods", help="list the registered pruning methods")
    p.set_defaults(func=run)


def run(args):
    from ..methods import all_methods

    methods = all_methods()
    width = max(map(len, methods))
    for name, m in methods.items():
        print(f"{name:<{width}}  {m.summary}")
        print(f"{'':<{width}}  --ratio R: {m.ratio_rule.describe()}")
    print("\nOne method's options: secateurs prune --method NAME --help")
