# Field verbose names through gettext_lazy: no change to the database.

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("task_workflow", "0002_history_content_type_without_constraint"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterField(
            model_name="transitionrecord",
            name="content_type",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="contenttypes.contenttype",
                verbose_name="content type",
            ),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="created_at",
            field=models.DateTimeField(
                db_index=True, default=django.utils.timezone.now, verbose_name="created at"
            ),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="entity_uuid",
            field=models.UUIDField(blank=True, db_index=True, null=True, verbose_name="entity uuid"),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="error_message",
            field=models.TextField(blank=True, default="", verbose_name="error message"),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="object_id",
            field=models.CharField(max_length=64, verbose_name="object id"),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="source_state",
            field=models.CharField(max_length=64, verbose_name="source state"),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="target_state",
            field=models.CharField(db_index=True, max_length=64, verbose_name="target state"),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="task_id",
            field=models.CharField(blank=True, default="", max_length=255, verbose_name="task id"),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="task_name",
            field=models.CharField(blank=True, default="", max_length=255, verbose_name="task name"),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="transition",
            field=models.CharField(max_length=100, verbose_name="transition"),
        ),
        migrations.AlterField(
            model_name="transitionrecord",
            name="user",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to=settings.AUTH_USER_MODEL,
                verbose_name="user",
            ),
        ),
    ]
