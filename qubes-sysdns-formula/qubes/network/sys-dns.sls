# qubes-sysdns-formula (GPL-2.0-or-later)
#
# Build the DNS service qube sys-dns running dnscrypt-proxy and route the qubes named
# in the pillar (by default sys-firewall) through it:
#   app qubes -> sys-firewall -> sys-dns -> sys-net
# Review:  sudo qubesctl state.show_sls qubes.network.sys-dns
# Apply:   sudo qubesctl --show-output state.sls qubes.network.sys-dns
{%- from "qubes/network/sys-dns/map.jinja" import sysdns, template_packages with context %}
{%- set template = sysdns.template.name %}
{%- set qube = sysdns.qube.name %}
{%- set template_side = salt['sysdns_config.render_template_files'](sysdns) %}
{%- set template_links = salt['sysdns_config.render_template_links']() %}
{%- set helpers = {
      '/usr/lib/sysdns/setup-template': 'setup-template.sh',
      '/usr/lib/sysdns/install-config': 'install-config.sh',
      '/usr/lib/sysdns/report': 'report.sh',
      '/usr/lib/sysdns/status': 'status.sh',
      '/usr/lib/sysdns/probe-upstream': 'probe-upstream.sh',
      '/usr/lib/sysdns/diagnose': 'diagnose.sh',
    } %}
{%- set template_files = {} %}
{%- for path, spec in template_side.items() %}
{%-   set entry = {'content': spec[0], 'mode': '%04o' | format(spec[1])} %}
{%-   do template_files.update({path: entry}) %}
{%- endfor %}
{%- set links = {} %}
{%- do links.update(template_links.masks) %}
{%- do links.update(template_links.wants) %}
{%- for path, filename in helpers.items() %}
{%-   set entry = {'source': 'salt://qubes/network/sys-dns/files/' ~ filename, 'mode': '0755'} %}
{%-   do template_files.update({path: entry}) %}
{%- endfor %}
{%- if sysdns.qube['class'] == 'DispVM' %}
{%-   set config_qube = sysdns.qube.disposable_template %}
{%- else %}
{%-   set config_qube = qube %}
{%- endif %}

# Checks the pillar against the qubes of this machine (existing rewire targets, the
# class of an existing sys-dns, no forwarding rule to sys-dns's own address) and
# changes nothing. They cannot run while the SLS renders, because state.show_sls calls
# no qvm-* tool. order: 1 runs it first, and failhard: True stops the run after it
# fails. Salt ignores failhard under test=True (State.check_failhard, Salt 3006 and
# 3007), so the template state also requires it, and every later state requires that
# one, directly or through another state: a test run reports them failed and unrun.
"qubes.network.sys-dns - pillar fits the qubes of this machine":
  sysdns.preflight:
    - name: {{ qube }}
    - klass: {{ sysdns.qube['class'] }}
    - rewire: {{ sysdns.rewire | json }}
    - forwarding_rules: {{ sysdns.dnscrypt.forwarding_rules | json }}
    - disposable_template: {{ (config_qube if sysdns.qube['class'] == 'DispVM' else none) | json }}
    - order: 1
    - failhard: True

"qubes.network.sys-dns - template {{ template }} present":
  sysdns.template_present:
    - name: {{ template }}
    - source: {{ sysdns.template.source }}
    - clone: {{ sysdns.template.clone }}
    - require:
      - sysdns: "qubes.network.sys-dns - pillar fits the qubes of this machine"

"qubes.network.sys-dns - packages and units in {{ template }}":
  sysdns.template_configured:
    - name: {{ template }}
    - packages: {{ template_packages | json }}
    - files: {{ template_files | json }}
    - links: {{ links | json }}
    - require:
      - sysdns: "qubes.network.sys-dns - template {{ template }} present"

{%- if sysdns.qube['class'] == 'DispVM' %}

"qubes.network.sys-dns - disposable template {{ config_qube }} present":
  sysdns.qube_present:
    - name: {{ config_qube }}
    - klass: AppVM
    - template: {{ template }}
    - label: {{ sysdns.qube.label }}
    - prefs:
        template_for_dispvms: true
        netvm: null
    - require:
      - sysdns: "qubes.network.sys-dns - packages and units in {{ template }}"

"qubes.network.sys-dns - configuration stored in {{ config_qube }}":
  sysdns.config_applied:
    - name: {{ config_qube }}
    - files: {{ salt['sysdns_config.config_files'](sysdns) | json }}
    - restart_qube: {{ qube }}
    - require:
      - sysdns: "qubes.network.sys-dns - disposable template {{ config_qube }} present"
{%- endif %}

# A sys-dns built by the original hand-written design keeps its DNAT script in /rw,
# its nft table and rules and its unit: remove them while the qube still runs as it
# was, before the next state moves it to the formula's template. A halted one is
# inspected by the second instance below, once it runs on that template with the
# formula's guard.
"qubes.network.sys-dns - {{ qube }} free of the original design's artifacts":
  sysdns.legacy_removed:
    - name: {{ qube }}
    - require:
      - sysdns: "qubes.network.sys-dns - packages and units in {{ template }}"

"qubes.network.sys-dns - qube {{ qube }} present":
  sysdns.qube_present:
    - name: {{ qube }}
    - klass: {{ sysdns.qube['class'] }}
    - template: {{ config_qube if sysdns.qube['class'] == 'DispVM' else template }}
    - label: {{ sysdns.qube.label }}
    - prefs:
        netvm: {{ sysdns.qube.netvm }}
        provides_network: true
        autostart: {{ sysdns.qube.autostart }}
        memory: {{ sysdns.qube.memory }}
        # 0 disables Qubes' memory balancing for the qube (property maxmem,
        # qubes/vm/qubesvm.py in qubes-core-admin).
        maxmem: {{ sysdns.qube.maxmem }}
        vcpus: {{ sysdns.qube.vcpus }}
    - features:
        # Units in the template start only in qubes with this Qubes service.
        service.sysdns: "1"
    - require:
      - sysdns: "qubes.network.sys-dns - packages and units in {{ template }}"
      - sysdns: "qubes.network.sys-dns - {{ qube }} free of the original design's artifacts"

"qubes.network.sys-dns - qube {{ qube }} running":
  sysdns.running:
    - name: {{ qube }}
    - watch:
      - sysdns: "qubes.network.sys-dns - packages and units in {{ template }}"
    - require:
      - sysdns: "qubes.network.sys-dns - qube {{ qube }} present"
{%- if sysdns.qube['class'] == 'DispVM' %}
      - sysdns: "qubes.network.sys-dns - configuration stored in {{ config_qube }}"
{%- endif %}

"qubes.network.sys-dns - {{ qube }} free of the original design's artifacts once running":
  sysdns.legacy_removed:
    - name: {{ qube }}
    - after_start: true
    - require:
      - sysdns: "qubes.network.sys-dns - qube {{ qube }} running"
{%- if sysdns.qube['class'] != 'DispVM' %}

"qubes.network.sys-dns - configuration of {{ qube }} applied":
  sysdns.config_applied:
    - name: {{ qube }}
    - files: {{ salt['sysdns_config.config_files'](sysdns) | json }}
    - require:
      - sysdns: "qubes.network.sys-dns - {{ qube }} free of the original design's artifacts once running"
{%- endif %}
{%- for client in sysdns.rewire %}

"qubes.network.sys-dns - {{ client }} routed through {{ qube }}":
  sysdns.netvm:
    - name: {{ client }}
    - netvm: {{ qube }}
    - require:
      - sysdns: "qubes.network.sys-dns - {{ qube }} free of the original design's artifacts once running"
{%-   if sysdns.qube['class'] != 'DispVM' %}
      - sysdns: "qubes.network.sys-dns - configuration of {{ qube }} applied"
{%-   endif %}
{%- endfor %}
