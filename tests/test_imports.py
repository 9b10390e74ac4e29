import subprocess
import sys


def test_import_distill_is_light():
    code = ("import sys, distill; heavy = [m for m in ('torch', 'timm', 'transformers', 'open_clip', 'accelerate') "
            "if m in sys.modules]; print(heavy); assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_names_resolve():
    import distill

    for name in ("load_teacher", "create_student", "load_student", "Distiller", "Tuner"):
        assert callable(getattr(distill, name))
