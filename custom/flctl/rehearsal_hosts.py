"""The deployment rehearsal's hosts: names, addresses, ports and the project they make (flctl rehearse).

The layout is told in flctl.rehearsal's docstring; each host is a network namespace (flctl.netns).
"""

SERVER_HOST = "flserver.rehearsal"
TRACKING_HOST = "mlflow.rehearsal"
SERVER_ADDR, ADMIN_ADDR, ROGUE_ADDR = "10.213.0.1", "10.213.0.5", "10.213.0.99"
LINK_SERVER, LINK_TRACKING = "10.213.1.1", "10.213.1.2"
FED_PORT, TRACKING_PORT, PG_PORT = 8002, 5000, 5432
PROJECT_ADMIN, MEMBER = "admin@coordinator.rehearsal", "member@hospital-a.rehearsal"
EXPERIMENT = "rehearsal"


def site_name(i: int) -> str:
    return f"site-{i}"


def description(sites: int, name="rehearsal", server_org="coordinator") -> dict:
    orgs = ["hospital_a", "hospital_b", "hospital_c", "bank_d"]
    return {
        "name": name,
        "server": {"host": SERVER_HOST, "org": server_org, "port": FED_PORT},
        "sites": [{"name": site_name(i), "org": orgs[(i - 1) % len(orgs)]} for i in range(1, sites + 1)],
        "admins": [
            {"email": PROJECT_ADMIN, "org": server_org, "role": "project_admin"},
            {"email": MEMBER, "org": "hospital_a", "role": "member"},
        ],
    }
