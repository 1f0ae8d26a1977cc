"""Steering tags from ACPI firmware, on both sides of a VM.

Host side (``tphtrap acpi host``): load the host's tables (:mod:`.tables`), find its PCI host
bridges (:mod:`.namespace`) and every CPU's ACPI processor UID (:mod:`.cpus`, :mod:`.madt`),
evaluate the TPH ``_DSM`` with Debian's ``acpiexec`` (:mod:`.acpiexec`, :mod:`.dsm`,
:mod:`.host`) and print a policy's ``host.steering_tags`` (:mod:`.hostreport`). Guest side
(``tphtrap acpi guest``): an SSDT with the same ``_DSM`` answering a VM's virtual tags
(:mod:`.guest`), compiled with ``iasl`` and checked against a guest DSDT
(:mod:`.guestcheck`). :mod:`.policytags` compares a policy with the firmware's answers.
No AML is interpreted here: acpiexec and iasl do that, each run time-bounded (:mod:`.tools`).
"""
