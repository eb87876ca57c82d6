# qubes-sysdns-formula (GPL-2.0-or-later)
#
# Undo qubes.network.sys-dns: every qube it routed through sys-dns gets its previous
# netvm back. With the pillar sysdns:rollback:remove_qubes true, sys-dns, its
# disposable template (class DispVM) and the template clone (template:clone true)
# are removed too, each only if it carries the feature the build set on it. A
# sys-dns that existed before the build (feature sysdns.adopted) is kept.
# Run it with the pillar the build used.
# Review:  sudo qubesctl state.show_sls qubes.network.sys-dns.rollback
# Apply:   sudo qubesctl --show-output state.sls qubes.network.sys-dns.rollback
{%- from "qubes/network/sys-dns/map.jinja" import sysdns with context %}
{%- set qube = sysdns.qube.name %}
{%- set template = sysdns.template.name %}
{%- set disposable = sysdns.qube['class'] == 'DispVM' %}
{%- set restored = "qubes.network.sys-dns.rollback - previous netvm of qubes routed through " ~ qube %}

"{{ restored }}":
  sysdns.netvm_restored:
    - name: {{ qube }}
    - qubes: {{ sysdns.rewire | json }}
{%- if sysdns.rollback.remove_qubes %}

"qubes.network.sys-dns.rollback - qube {{ qube }} absent":
  sysdns.absent:
    - name: {{ qube }}
    # qube_present of the build sets this feature on sys-dns.
    - marker: service.sysdns
    - require:
      - sysdns: "{{ restored }}"
{%-   set removed = {qube: 'service.sysdns'} %}
{%-   set last = "qubes.network.sys-dns.rollback - qube " ~ qube ~ " absent" %}
{%-   if disposable %}

"qubes.network.sys-dns.rollback - disposable template {{ sysdns.qube.disposable_template }} absent":
  sysdns.absent:
    - name: {{ sysdns.qube.disposable_template }}
    # config_applied of the build records the configuration in this feature.
    - marker: sysdns.config
    - removed_before: {{ removed | json }}
    - require:
      - sysdns: "{{ last }}"
{%-     do removed.update({sysdns.qube.disposable_template: 'sysdns.config'}) %}
{%-     set last = "qubes.network.sys-dns.rollback - disposable template " ~ sysdns.qube.disposable_template ~ " absent" %}
{%-   endif %}
{%-   if sysdns.template.clone %}

"qubes.network.sys-dns.rollback - template {{ template }} absent":
  sysdns.absent:
    - name: {{ template }}
    # template_configured of the build records its work in this feature. Without a
    # clone the template is the user's own and is never removed.
    - marker: sysdns.template
    - removed_before: {{ removed | json }}
    - require:
      - sysdns: "{{ last }}"
{%-   endif %}
{%- endif %}
