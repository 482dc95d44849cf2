"""`python -m storage import|export|stats|leaderboard|hash-password`: the store from the command line.

Success prints one JSON line and exits 0; any failure prints one `error: ...` line on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from storage.db import default_db_path
from storage.exporters import EXTENSIONS
from storage.exporters import FORMATS as EXPORT_FORMATS
from storage.importers import FORMATS as IMPORT_FORMATS


class _Parser(argparse.ArgumentParser):
    """Usage mistakes too end as one `error:` line and exit code 1 (argparse prints usage and exits 2)."""

    def error(self, message: str):
        print(f"error: {message} (see python -m storage --help)", file=sys.stderr)
        sys.exit(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m storage", description="Import, export and count judgements.")
    commands = parser.add_subparsers(dest="command", required=True)
    db_help = "DuckDB file or postgresql://user@host/db URL (default: $PREFLOOP_DB or data/prefloop.duckdb)"

    imp = commands.add_parser("import", help="import a prompt list or a preference dataset")
    imp.add_argument("path", help="a .txt .csv .json .jsonl or .parquet file")
    imp.add_argument("--db", default=default_db_path(), help=db_help)
    imp.add_argument("--format", default="auto", choices=["auto", *IMPORT_FORMATS])

    exp = commands.add_parser("export", help="export judgements as a training dataset")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    exp.add_argument("--out", required=True, help=f"output file ({' or '.join(EXTENSIONS)})")
    exp.add_argument("--db", default=default_db_path(), help=db_help)
    exp.add_argument("--push-to-hub", metavar="REPO", help="also upload it as a Hugging Face dataset")

    stats = commands.add_parser("stats", help="counts per choice, annotator, source and model version")
    stats.add_argument("--db", default=default_db_path(), help=db_help)

    board = commands.add_parser("leaderboard", help="Bradley–Terry ratings of the models, best first, with 95%% CIs")
    board.add_argument("--db", default=default_db_path(), help=db_help + "; opened read-only")
    board.add_argument("--bootstrap", type=int, default=200, help="resamples for the CIs (0: none; default 200)")
    board.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")

    hasher = commands.add_parser("hash-password", help="print a password hash for the --auth users file")
    hasher.add_argument("--password", help="the password (default: read one line from standard input)")
    return parser.parse_args(argv)


def read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return args.password
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("password: ")
    return sys.stdin.readline().rstrip("\n")


def open_store(db: str):
    """The store, or one clear error when the file is locked by another process (DuckDB allows one)."""
    import duckdb

    from storage.db import Store

    try:
        return Store(db)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise RuntimeError(
                f"{db} is open in another process (the app?); stop it or use another --db file"
            ) from None
        raise RuntimeError(f"cannot open {db}: {exc}") from None


def check_input_file(path: str) -> None:
    """The file to import exists and is a file: checked before the database file is created or opened."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory, not a file")
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")


def check_existing_db(db: str) -> None:
    """A command that only reads refuses a database file that is not there (a mistyped --db would create one)."""
    from storage.postgres import is_postgres

    if is_postgres(db) or db == ":memory:" or Path(db).is_file():
        return
    if Path(db).is_dir():
        raise ValueError(f"--db {db} is a directory, not a database file")
    raise ValueError(f"--db {db}: no such database file (python -m storage import creates one)")


def new_db_files(db: str) -> list[Path]:
    """What opening `db` would create when it is a DuckDB file not there yet: the file, its WAL and any missing
    folders above it (deepest first); [] when it exists or is not a file."""
    from storage.postgres import is_postgres

    path = Path(db)
    if is_postgres(db) or db == ":memory:" or path.exists():
        return []
    missing = [parent for parent in path.parents if not parent.exists()]
    return [path, path.with_name(path.name + ".wal"), *missing]


def remove_new_db(created: list[Path]) -> None:
    """A failed import into a new database leaves nothing behind: the file, its WAL and the folders made for it."""
    for path in created:
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError:  # a folder something else has put a file in since: it stays
            pass


def run(args: argparse.Namespace) -> dict | list:
    if args.command == "export" and Path(args.out).suffix.lower() not in EXTENSIONS:
        raise ValueError(f"--out {args.out} must end in {' or '.join(EXTENSIONS)}")
    if args.command == "import":
        check_input_file(args.path)
    elif args.command != "hash-password":
        check_existing_db(args.db)
    if args.command == "hash-password":  # prints a JSON string: paste it as the user's "password"
        from storage.passwords import hash_password

        return hash_password(read_password(args))
    if args.command == "leaderboard":  # read-only: never creates or migrates the file
        from storage.ratings import leaderboard_from_file

        return leaderboard_from_file(args.db, bootstrap=args.bootstrap, seed=args.seed)
    if args.command == "import":
        return run_import(args)
    store = open_store(args.db)
    try:
        if args.command == "export":
            from storage.exporters import export, push_to_hub

            result = {"format": args.format, "rows": export(store, args.format, args.out), "out": args.out}
            if args.push_to_hub:
                try:
                    push_to_hub(store, args.format, args.push_to_hub)
                except Exception as exc:  # network, token or repository trouble: the local file is still good
                    raise RuntimeError(
                        f"wrote {args.out}, but pushing to the Hugging Face Hub repo {args.push_to_hub} failed: {exc}"
                    ) from None
                result["pushed_to"] = args.push_to_hub
            return result
        return store.stats()
    finally:
        store.close(checkpoint=args.command != "stats")  # stats only reads (and saves a small tally snapshot)


def run_import(args: argparse.Namespace) -> dict:
    """Import one file; when it fails and the database is new, the database file is removed again."""
    from storage.importers import import_file

    created = new_db_files(args.db)
    try:
        store = open_store(args.db)
        try:
            return import_file(store, args.path, fmt=args.format)
        finally:
            store.close()
    except Exception:
        remove_new_db(created)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except Exception as exc:  # one line for people, never a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
