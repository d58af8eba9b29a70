"""``secateurs methods``: the registered methods, one line each."""


def register(sub):
    p = sub.add_parser("methods", help="list the registered pruning methods")
    p.set_defaults(func=run)


def run(args):
    from ..methods import all_methods

    methods = all_methods()
    width = max(map(len, methods))
    for name, m in methods.items():
        print(f"{name:<{width}}  {m.summary}")
