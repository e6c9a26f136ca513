# Install edge-vlm and its models from this kit, offline: no package index, no compiler.
#
#   powershell -ExecutionPolicy Bypass -File install.ps1 [-Prefix DIR] [-Python PATH] [-NoSelfCheck]
#
# Written for Windows kits (built with `edge-vlm kit build` on Windows) and NOT TESTED: the
# project's machines run Linux. It does what install.sh does: finds a Python this kit has
# wheels for and runs install.py, which checks the kit before it creates anything.
param(
  [string]$Prefix = "",
  [string]$Python = "",
  [switch]$NoSelfCheck
)
$ErrorActionPreference = "Stop"
$here = Split-Path -Parent $MyInvocation.MyCommand.Path
$kitPythons = "@PYTHONS@".Split(" ")

function Get-PyVersion([string[]]$cmd) {
  try {
    $exe = $cmd[0]; $rest = @(); if ($cmd.Length -gt 1) { $rest = $cmd[1..($cmd.Length - 1)] }
    $out = & $exe @rest -c "import sys; print('%d.%d' % sys.version_info[:2])" 2>$null
    if ($LASTEXITCODE -eq 0) { return "$out".Trim() }
  } catch { }
  return ""
}

$pyCmd = $null
if ($Python -ne "") {
  if ((Get-PyVersion @($Python)) -eq "") { Write-Error "install: --Python $Python does not run"; exit 2 }
  $pyCmd = @($Python)
} else {
  foreach ($v in $kitPythons) {
    foreach ($c in @(@("py", "-$v"), @("python"), @("python3"))) {
      if ((Get-PyVersion $c) -eq $v) { $pyCmd = $c; break }
    }
    if ($pyCmd) { break }
  }
  if (-not $pyCmd) {
    foreach ($c in @(@("python"), @("py", "-3"))) {
      if ((Get-PyVersion $c) -ne "") { $pyCmd = $c; break }
    }
  }
  if (-not $pyCmd) { Write-Error "install: no Python 3 found; this kit needs Python $kitPythons (pass -Python PATH)"; exit 2 }
}

$installArgs = @()
if ($Prefix -ne "") { $installArgs += @("--prefix", $Prefix) }
if ($NoSelfCheck) { $installArgs += "--no-self-check" }
$exe = $pyCmd[0]; $rest = @(); if ($pyCmd.Length -gt 1) { $rest = $pyCmd[1..($pyCmd.Length - 1)] }
& $exe @rest (Join-Path $here "install.py") @installArgs
exit $LASTEXITCODE
