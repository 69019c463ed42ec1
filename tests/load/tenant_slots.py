"""Which tenant each Locust user belongs to: shared by locustfile.py and run.py (no Locust import).

User i (in start order) is a client of slots(tenants)[i % len(slots)]: a smooth weighted round
robin, so even a handful of users covers every tenant in proportion to its weight (a random draw
could leave the small tenant without a user).
"""


def slots(tenants, size=20):
    """tenants: [{"tenant", "key", "weight"}]; returns the cycle of tenant dicts."""
    total = sum(t["weight"] for t in tenants)
    counts = [max(1, round(size * t["weight"] / total)) for t in tenants]
    out, credit = [], [0.0] * len(tenants)
    for _ in range(sum(counts)):
        for i, c in enumerate(counts):
            credit[i] += c
        best = max(range(len(tenants)), key=lambda i: credit[i])
        credit[best] -= sum(counts)
        out.append(tenants[best])
    return out


def users_per_tenant(tenants, users):
    """{tenant name: number of users} for `users` users started in order."""
    cycle = slots(tenants)
    out = {t["tenant"]: 0 for t in tenants}
    for i in range(users):
        out[cycle[i % len(cycle)]["tenant"]] += 1
    return out
