"""Write and check FLARE's project.yml from a short description, and provision startup kits.

    flctl project DESCRIPTION.yml [--out project.yml] [--provision DIR]
    flctl project --server HOST --site NAME:ORG ... --admin EMAIL:ORG:ROLE ... [...]

A description (YAML) names the FL server's host, the sites and their organisations and the
admins with their roles:

    name: hello-fl                 # project name (default hello-fl)
    server: {host: fl.example.org, org: coordinator, port: 8002}
    sites:
      - {name: site-1, org: hospital_a}
    admins:
      - {email: admin@coordinator.org, org: coordinator, role: project_admin}
      - {email: lead@hospital-a.org, org: hospital_a, role: lead}

Roles are FLARE's: project_admin (exactly one), org_admin, lead, member. Every bad definition
is reported on its own line, all of them before anything is written. With --provision DIR,
`nvflare provision` builds the kits (one root CA, a certificate per participant) into
DIR/<name>/prod_NN; the folder of the newest kits is printed.
"""

import subprocess
import sys
from pathlib import Path

import yaml

from flctl.errors import CliError


def org_problems(label: str, org) -> list:
    """Sites and admins alike belong to an organisation that FLARE accepts as a name."""
    if not org:
        return [f"{label}: no organisation (org)"]
    if bad_name(org, "org"):
        return [f"{label}: org {org!r}: letters, digits or '_' only"]
    return []


def bad_name(name, kind) -> bool:
    """FLARE's own rule for a name of this kind (server, client, admin, org), which provision applies."""
    from nvflare.apis.utils.format_check import name_check

    return not isinstance(name, str) or name_check(name, kind)[0]


ROLES = ("project_admin", "org_admin", "lead", "member")
DEFAULT_PORT = 8002


class ProjectError(ValueError):
    """One or more bad definitions; str() is one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _entries(description: dict, key: str, problems: list) -> list:
    value = description.get(key) or []
    if not isinstance(value, list):
        problems.append(f"{key}: must be a list, got {type(value).__name__}")
        return []
    good = []
    for i, entry in enumerate(value, 1):
        if isinstance(entry, dict):
            good.append(entry)
        else:
            problems.append(f"{key} #{i}: must be a mapping, got {entry!r}")
    return good


def check_description(description) -> list:
    """Every problem of a description, one line each (empty: good)."""
    if not isinstance(description, dict):
        return [f"the description must be a mapping, got {type(description).__name__}"]
    problems = []
    unknown = sorted(set(description) - {"name", "server", "sites", "admins"})
    problems += [f"unknown key {k!r} (expected name, server, sites, admins)" for k in unknown]
    name = description.get("name", "hello-fl")
    if bad_name(name, "client"):
        problems.append(f"project name {name!r}: letters, digits, '-' or '_' only")
    server = description.get("server")
    if isinstance(server, str):
        server = {"host": server}
    if not isinstance(server, dict) or not server.get("host"):
        problems.append("server: a host name is needed (server: {host: fl.example.org, org: ...})")
        server = {}
    host = server.get("host")
    if host and bad_name(host, "server"):
        problems.append(f"server host {host!r}: not a valid host name")
    if "org" in server:  # optional for the server (it defaults), checked as every organisation is
        problems += org_problems("server", server["org"])
    port = server.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        problems.append(f"server port {port!r}: must be a number from 1 to 65535")

    names = {host: "the server"} if host else {}

    def taken(name, what):
        if name in names:
            problems.append(f"{what} {name!r}: duplicate name (also {names[name]})")
            return True
        names[name] = what
        return False

    sites = _entries(description, "sites", problems)
    if not sites and "sites" not in unknown:
        problems.append("sites: at least one site is needed")
    for i, site in enumerate(sites, 1):
        site_name, org = site.get("name"), site.get("org")
        label = f"site {site_name!r}" if site_name else f"site #{i}"
        if bad_name(site_name, "client"):
            problems.append(f"{label}: a name of letters, digits, '-' or '_' is needed")
        else:
            taken(site_name, "site")
        problems += org_problems(label, org)
        extra = sorted(set(site) - {"name", "org"})
        problems += [f"{label}: unknown key {k!r}" for k in extra]

    admins = _entries(description, "admins", problems)
    for i, admin in enumerate(admins, 1):
        email, org, role = admin.get("email"), admin.get("org"), admin.get("role")
        label = f"admin {email!r}" if email else f"admin #{i}"
        if bad_name(email, "admin"):
            problems.append(f"{label}: not an e-mail address (user@domain.tld)")
        else:
            taken(email, "admin")
        problems += org_problems(label, org)
        if role not in ROLES:
            problems.append(f"{label}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        extra = sorted(set(admin) - {"email", "org", "role"})
        problems += [f"{label}: unknown key {k!r}" for k in extra]
    project_admins = [a for a in admins if a.get("role") == "project_admin"]
    if len(project_admins) != 1:
        problems.append(f"admins: exactly one project_admin is needed, found {len(project_admins)}")
    return problems


def project_yml(description: dict) -> dict:
    """FLARE's project.yml (api_version 3) for a good description (check_description first)."""
    server = description["server"]
    server = {"host": server} if isinstance(server, str) else server
    admins = description.get("admins") or []
    server_org = server.get("org") or next(a["org"] for a in admins if a["role"] == "project_admin")
    participants = [
        {
            "name": server["host"],
            "type": "server",
            "org": server_org,
            "fed_learn_port": server.get("port", DEFAULT_PORT),
        }
    ]
    participants += [{"name": s["name"], "type": "client", "org": s["org"]} for s in description["sites"]]
    participants += [{"name": a["email"], "type": "admin", "org": a["org"], "role": a["role"]} for a in admins]
    return {
        "api_version": 3,
        "name": description.get("name", "hello-fl"),
        "description": "written by flctl project",
        "participants": participants,
        # FLARE's standard builders: workspace layout, static configs, one root CA and a
        # certificate per participant, signed startup kits.
        "builders": [
            {
                "path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
                "args": {"template_file": "master_template.yml"},
            },
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }


def load_description(path) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise CliError(f"cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not YAML: {str(e).splitlines()[0]}") from None


def description_from_args(server, sites, admins, name=None) -> dict:
    """--server HOST, --site NAME:ORG, --admin EMAIL:ORG:ROLE as a description."""
    problems = []
    out = {"server": {"host": server}, "sites": [], "admins": []}
    if name:
        out["name"] = name
    for text in sites or []:
        site_name, _, org = text.partition(":")
        out["sites"].append({"name": site_name, **({"org": org} if org else {})})
    for text in admins or []:
        parts = text.split(":")
        if len(parts) != 3:
            problems.append(f"--admin {text!r}: expected EMAIL:ORG:ROLE")
            continue
        out["admins"].append(dict(zip(("email", "org", "role"), parts, strict=True)))
    if problems:
        raise ProjectError(problems)
    return out


def write_project(description: dict, out) -> Path:
    """Checks the description and writes project.yml; ProjectError lists every problem."""
    problems = check_description(description)
    if problems:
        raise ProjectError(problems)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(project_yml(description), sort_keys=False))
    return out


def provision(project_file, workspace, log=None) -> Path:
    """`nvflare provision`; returns the newest prod_NN folder of kits."""
    project_file, workspace = Path(project_file).resolve(), Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    log = Path(log or workspace / "provision.log")
    name = yaml.safe_load(project_file.read_text())["name"]
    nvflare = str(Path(sys.executable).parent / "nvflare")
    with open(log, "w") as out:
        done = subprocess.run(
            [nvflare, "provision", "-p", str(project_file), "-w", str(workspace), "--force"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workspace,
            timeout=300,
        )
    prods = sorted((workspace / name).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))
    if done.returncode != 0 or not prods:
        raise CliError(f"nvflare provision failed; see {log}")
    return prods[-1]


def register(subparsers) -> None:
    p = subparsers.add_parser("project", help="write project.yml and provision startup kits", description=__doc__)
    p.add_argument("description", nargs="?", help="a description (YAML); or --server/--site/--admin")
    p.add_argument("--name", help="project name (default hello-fl)")
    p.add_argument("--server", help="the FL server's host name")
    p.add_argument("--site", action="append", metavar="NAME:ORG", help="a site and its organisation (repeat)")
    p.add_argument("--admin", action="append", metavar="EMAIL:ORG:ROLE", help="an admin user (repeat)")
    p.add_argument("--out", default="project.yml", help="project.yml to write (default %(default)s)")
    p.add_argument("--provision", metavar="DIR", help="then build the startup kits into DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.description and (args.server or args.site or args.admin):
        raise CliError("give a description file or --server/--site/--admin, not both")
    try:
        if args.description:
            description = load_description(args.description)
            if args.name and isinstance(description, dict):
                description["name"] = args.name
        else:
            description = description_from_args(args.server, args.site, args.admin, args.name)
        out = write_project(description, args.out)
    except ProjectError as e:
        for line in e.problems:
            print(f"flctl project: {line}", file=sys.stderr)
        raise CliError(f"{len(e.problems)} problem(s); nothing written") from None
    print(f"project: wrote {out}")
    if args.provision:
        prod = provision(out, args.provision)
        print(f"project: startup kits in {prod}")
    return 0
