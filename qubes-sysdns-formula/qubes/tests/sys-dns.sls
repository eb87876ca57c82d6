# qubes-sysdns-formula (GPL-2.0-or-later)
#
# Prove that sys-dns works: the chain, clients resolve, no plaintext DNS leaves sys-dns,
# and dnscrypt-proxy exchanges data with its encrypted upstream resolvers.
# Run:  sudo qubesctl --show-output state.sls qubes.tests.sys-dns
{%- from "qubes/network/sys-dns/map.jinja" import sysdns with context %}
{%- set qube = sysdns.qube.name %}
{%- set clients = sysdns.tests.clients %}
{%- set names = sysdns.tests.names %}

"qubes.tests.sys-dns - chain through {{ qube }}":
  sysdns_check.chain:
    - name: {{ qube }}
    - netvm: {{ sysdns.qube.netvm }}
    - rewired: {{ sysdns.rewire | json }}

"qubes.tests.sys-dns - clients resolve":
  sysdns_check.clients_resolve:
    - name: {{ qube }}
    - clients: {{ clients | json }}
    - dns_names: {{ names | json }}

"qubes.tests.sys-dns - no plaintext DNS leaves {{ qube }}":
  sysdns_check.no_plaintext_leak:
    - name: {{ qube }}
    - clients: {{ clients | json }}
    - dns_names: {{ names | json }}

"qubes.tests.sys-dns - encrypted upstream sessions":
  sysdns_check.upstream_encrypted:
    - name: {{ qube }}
    - clients: {{ clients | json }}
    - dns_names: {{ names | json }}

"qubes.tests.sys-dns - summary":
  sysdns_check.summary
